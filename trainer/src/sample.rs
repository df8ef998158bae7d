//! Generation from a trained run (Chameleon setting): loading a checkpoint, a seeded host-side
//! sampler (temperature, top-k, top-p), and the decoding loop whose constraints keep every
//! segment well formed — an image is exactly `grid` codes from the image block, then EOI;
//! speech is units until EOSP (or the cap); text ends at EOS or the token budget.
//!
//! Decoding feeds each sampled token through [`Model::forward_cached`], so generating `n`
//! tokens costs `n` one-row forwards; `use_cache: false` recomputes the whole prefix per
//! token instead (the baseline `motley bench sample` measures against).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use motley_shards::{Manifest, Modality, Vocab};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tch::{Device, Tensor, nn};

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::data::{BatchSource, SyntheticSource};
use crate::error::TrainError;
use crate::model::{KvCache, Model};
use crate::train::resolve_device;

// ---------------------------------------------------------------------------------------
// Loading a run
// ---------------------------------------------------------------------------------------

/// A checkpoint ready to generate from.
#[derive(Debug)]
pub struct LoadedRun {
    pub model: Model,
    /// Holds the parameters `model` refers to.
    pub vs: nn::VarStore,
    /// The run's resolved configuration (from the checkpoint's meta.json).
    pub config: TrainConfig,
    /// The checkpoint folder loaded (`RUN/checkpoints/step-N`).
    pub checkpoint: PathBuf,
    pub step: u64,
    /// The corpus's global vocabulary (its layout tells the sampler which ids are which).
    pub vocab: Vocab,
    /// The first corpus directory the run trained on (None for synthetic data).
    pub corpus: Option<PathBuf>,
    /// The run's copies of its corpus's tokenizers (`RUN/tokenizers/`), when it has them.
    pub tokenizers: Option<PathBuf>,
}

/// Loads the latest checkpoint of run `path` (or the checkpoint folder `path`) onto `device`
/// (`auto`, `cpu`, `cuda[:N]`). The vocabulary layout comes from the checkpoint's meta.json;
/// `corpus` overrides that with a corpus's manifest (as do checkpoints that predate it, from
/// the run's first `data.paths` entry).
pub fn load_run(path: &Path, device: &str, corpus: Option<&Path>) -> Result<LoadedRun, TrainError> {
    let ckpt = checkpoint::resolve(path)?;
    let meta = checkpoint::read_meta(&ckpt)?;
    let config = meta.config;
    let recorded = config.data.paths.first().cloned();
    let read_manifest = |dir: &Path| {
        Manifest::read(dir).map(|m| m.vocab).map_err(|e| TrainError::Data {
            path: dir.display().to_string(),
            msg: format!("cannot read the corpus manifest the run trained on (pass its corpus explicitly): {e}"),
        })
    };
    let (vocab, corpus) = match (corpus, meta.vocab, recorded) {
        (Some(dir), _, _) => (read_manifest(dir)?, Some(dir.to_path_buf())),
        (None, Some(vocab), recorded) => (vocab, recorded),
        (None, None, Some(dir)) => (read_manifest(&dir)?, Some(dir)),
        (None, None, None) if config.data.synthetic => {
            (SyntheticSource::new(config.train.seed, 1, 8).vocab().clone(), None)
        }
        (None, None, None) => {
            return Err(TrainError::Config {
                path: ckpt.join(checkpoint::META_FILE).display().to_string(),
                msg: "the run names no corpus (data.paths is empty)".into(),
            });
        }
    };
    if i64::from(vocab.total_size) > config.model.vocab_size {
        return Err(TrainError::Config {
            path: "model.vocab_size".into(),
            msg: format!(
                "checkpoint vocabulary {} is smaller than the corpus's {}",
                config.model.vocab_size, vocab.total_size
            ),
        });
    }
    let device = resolve_device(device)?;
    let vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), &config.model)?;
    checkpoint::load_weights(&vs, &ckpt)?;
    let tokenizers = checkpoint::run_of(&ckpt).map(|r| r.join(checkpoint::TOKENIZERS_DIR)).filter(|d| d.is_dir());
    Ok(LoadedRun { model, vs, config, checkpoint: ckpt, step: meta.step, vocab, corpus, tokenizers })
}

// ---------------------------------------------------------------------------------------
// Sampler
// ---------------------------------------------------------------------------------------

/// How the next token is drawn from the logits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 = greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely ids (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely ids whose probability reaches p (1 = all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// Draws ids on the host with its own seeded generator: the same seed, logits and
/// constraints always give the same ids (torch's global generator is not involved).
#[derive(Debug)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Result<Self, TrainError> {
        let bad = |path: &str, msg: String| Err(TrainError::Config { path: path.into(), msg });
        if !(cfg.temperature >= 0.0) || !cfg.temperature.is_finite() {
            return bad("temperature", format!("must be a finite number >= 0 (got {})", cfg.temperature));
        }
        if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1] (got {})", cfg.top_p));
        }
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        Ok(Sampler { cfg, rng })
    }

    /// Samples one id among `allowed` (half-open global id ranges) from `logits` over the whole
    /// vocabulary. Ids outside `allowed` can never come out, whatever their logits; None when
    /// no allowed id has a finite logit.
    pub fn sample(&mut self, logits: &[f32], allowed: &[Range<u32>]) -> Option<u32> {
        let mut cand: Vec<(u32, f64)> = allowed
            .iter()
            .flat_map(|r| r.clone())
            .filter_map(|id| logits.get(id as usize).map(|&l| (id, f64::from(l))))
            .filter(|(_, l)| l.is_finite())
            .collect();
        if cand.is_empty() {
            return None;
        }
        // Most likely first; ties by id so the order never depends on the ranges' order.
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.cfg.temperature == 0.0 {
            return Some(cand[0].0);
        }
        if self.cfg.top_k > 0 {
            cand.truncate(self.cfg.top_k);
        }
        let top = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|(_, l)| ((l - top) / self.cfg.temperature).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= self.cfg.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return Some(cand[i].0);
            }
            u -= p;
        }
        cand.last().map(|c| c.0)
    }
}

// ---------------------------------------------------------------------------------------
// Constraints
// ---------------------------------------------------------------------------------------

/// Where in the sequence the sampler stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Text,
    /// Inside an image with `filled` codes so far (EOI is due once `filled == grid`).
    Image {
        filled: usize,
    },
    /// Inside a speech segment with `len` units so far.
    Speech {
        len: usize,
    },
}

/// The id layout the constraints work from: which global ids are text, image codes, speech
/// units and structural markers, the image grid, and the cap on a speech segment.
#[derive(Debug, Clone)]
pub struct Constraints {
    text: Range<u32>,
    image: Range<u32>,
    speech: Range<u32>,
    eos: u32,
    boi: u32,
    eoi: u32,
    bosp: u32,
    eosp: u32,
    /// Codes per image (grid rows * cols); 0 disables image generation.
    pub image_tokens: usize,
    /// Units after which EOSP is forced.
    pub max_speech_units: usize,
}

impl Constraints {
    /// From the corpus vocabulary. `image_tokens` comes from the image tokenizer's grid; a
    /// continuous (latent) image block has no codes, so discrete image generation is off.
    pub fn new(vocab: &Vocab, image_tokens: usize, max_speech_units: usize) -> Result<Self, TrainError> {
        let block = |m: Modality| -> Range<u32> {
            vocab.modality(m).filter(|v| v.latent_dim.is_none()).map_or(0..0, |v| v.offset..v.offset + v.vocab_size)
        };
        let sp = |n: &str| {
            vocab.special(n).ok_or_else(|| TrainError::Config {
                path: "vocab.specials".into(),
                msg: format!("the corpus vocabulary has no `{n}` special"),
            })
        };
        let image = block(Modality::Image);
        Ok(Constraints {
            text: block(Modality::Text),
            image_tokens: if image.is_empty() { 0 } else { image_tokens },
            image,
            speech: block(Modality::Speech),
            eos: sp("eos")?,
            boi: sp("boi")?,
            eoi: sp("eoi")?,
            bosp: sp("bosp")?,
            eosp: sp("eosp")?,
            max_speech_units: max_speech_units.max(1),
        })
    }

    pub fn boi(&self) -> u32 {
        self.boi
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Global ids of image codes.
    pub fn image_range(&self) -> Range<u32> {
        self.image.clone()
    }

    /// Ids that may come next in `mode`.
    pub fn allowed(&self, mode: Mode) -> Vec<Range<u32>> {
        let one = |id: u32| id..id + 1;
        match mode {
            Mode::Text => {
                let mut v = vec![self.text.clone(), one(self.eos)];
                if self.image_tokens > 0 {
                    v.push(one(self.boi));
                }
                if !self.speech.is_empty() {
                    v.push(one(self.bosp));
                }
                v
            }
            Mode::Image { filled } if filled < self.image_tokens => vec![self.image.clone()],
            Mode::Image { .. } => vec![one(self.eoi)],
            Mode::Speech { len } if len < self.max_speech_units => vec![self.speech.clone(), one(self.eosp)],
            Mode::Speech { .. } => vec![one(self.eosp)],
        }
    }

    /// The mode after `id` (prompts are walked through this too, so a prompt ending in BOI
    /// starts generation inside an image).
    pub fn advance(&self, mode: Mode, id: u32) -> Mode {
        match mode {
            Mode::Image { .. } if id == self.eoi => Mode::Text,
            Mode::Image { filled } if self.image.contains(&id) => Mode::Image { filled: filled + 1 },
            Mode::Speech { .. } if id == self.eosp => Mode::Text,
            Mode::Speech { len } if self.speech.contains(&id) => Mode::Speech { len: len + 1 },
            _ if id == self.boi => Mode::Image { filled: 0 },
            _ if id == self.bosp => Mode::Speech { len: 0 },
            m => m,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------

/// Length and stopping of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateOptions {
    /// Tokens to generate at most; an image already begun is always completed (so its grid is
    /// full), which may run up to `grid + 1` past this.
    pub max_tokens: usize,
    /// Stop at EOS (benchmarks turn this off to generate exactly `max_tokens`).
    pub stop_at_eos: bool,
    /// Stop once the first generated image is closed (`motley sample --image`).
    pub stop_after_image: bool,
    /// Reuse keys and values (linear time); false recomputes the prefix for every token.
    pub use_cache: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_tokens: 256, stop_at_eos: true, stop_after_image: false, use_cache: true }
    }
}

/// A run of generated tokens of one modality (markers stripped, local ids).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenSegment {
    pub modality: Modality,
    /// Per-modality local ids (global minus the block's offset).
    pub ids: Vec<u32>,
    /// Closed by its end marker (EOI / EOSP); text segments count as complete.
    pub complete: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    ImageDone,
    MaxTokens,
}

/// What one generation produced and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Generated global ids, in order (the prompt not included).
    pub tokens: Vec<u32>,
    /// Each generated id's log-probability under the model itself: the log-softmax of the raw
    /// logits over the whole vocabulary (no temperature, top-k/p or constraint applied), what
    /// another implementation of the model computes for the same sequence.
    pub logprobs: Vec<f32>,
    pub segments: Vec<GenSegment>,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    /// Seconds to run the prompt through the model.
    pub prefill_seconds: f64,
    /// Seconds spent generating (model forwards plus sampling) after the prefill.
    pub decode_seconds: f64,
}

impl Generation {
    /// Generated tokens per second of decoding.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens.len() as f64 / self.decode_seconds.max(1e-9)
    }
}

/// Last row of `[T, V]` logits on the host.
fn last_row(logits: &Tensor) -> Result<Vec<f32>, TrainError> {
    let t = logits.size()[0];
    let row = logits.get(t - 1).to_device(Device::Cpu);
    Vec::<f32>::try_from(&row).map_err(TrainError::torch("logits to host"))
}

fn modalities(vocab: &Vocab, ids: &[u32]) -> Vec<u8> {
    ids.iter().map(|&i| vocab.modality_of(i) as u8).collect()
}

/// Generates a continuation of `prompt` (global ids; usually BOS + text, optionally BOI)
/// with `model`. `progress` is called with the number of tokens generated so far.
pub fn generate(
    model: &Model,
    vocab: &Vocab,
    constraints: &Constraints,
    prompt: &[u32],
    sampler: &mut Sampler,
    opts: &GenerateOptions,
    progress: impl FnMut(usize),
) -> Result<Generation, TrainError> {
    let mut cache = KvCache::new(&model.cfg);
    let mut seq: Vec<u32> = Vec::new();
    let use_cache = opts.use_cache;
    let feed = |ids: &[u32]| -> Result<Vec<f32>, TrainError> {
        seq.extend_from_slice(ids);
        let out = if use_cache {
            model.forward_cached(ids, &modalities(vocab, ids), &mut cache)?
        } else {
            // The baseline: a fresh forward over the whole sequence for every new token.
            let mut fresh = KvCache::new(&model.cfg);
            model.forward_cached(&seq, &modalities(vocab, &seq), &mut fresh)?
        };
        last_row(&out)
    };
    generate_with(feed, vocab, constraints, prompt, sampler, opts, progress)
}

/// The decoding loop over any next-token source: `feed(ids)` appends `ids` to the sequence
/// and returns the logits `[V]` that follow it.
pub fn generate_with(
    mut feed: impl FnMut(&[u32]) -> Result<Vec<f32>, TrainError>,
    vocab: &Vocab,
    constraints: &Constraints,
    prompt: &[u32],
    sampler: &mut Sampler,
    opts: &GenerateOptions,
    mut progress: impl FnMut(usize),
) -> Result<Generation, TrainError> {
    if prompt.is_empty() {
        return Err(TrainError::Batch("the prompt is empty (it needs at least BOS)".into()));
    }
    let start_mode = prompt.iter().fold(Mode::Text, |m, &id| constraints.advance(m, id));
    let mut mode = start_mode;
    let t0 = Instant::now();
    let mut logits = feed(prompt)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut generated = Vec::new();
    let mut logprobs = Vec::new();
    let stop = loop {
        let id = sampler.sample(&logits, &constraints.allowed(mode)).ok_or_else(|| {
            TrainError::Batch(format!(
                "no allowed id has a finite logit at position {} ({mode:?})",
                prompt.len() + generated.len()
            ))
        })?;
        let before = mode;
        mode = constraints.advance(mode, id);
        generated.push(id);
        logprobs.push(log_softmax_at(&logits, id));
        progress(generated.len());
        if opts.stop_at_eos && id == constraints.eos {
            break StopReason::Eos;
        }
        if opts.stop_after_image && matches!(before, Mode::Image { .. }) && mode == Mode::Text {
            break StopReason::ImageDone;
        }
        if generated.len() >= opts.max_tokens && !matches!(mode, Mode::Image { .. }) {
            break StopReason::MaxTokens;
        }
        logits = feed(&[id])?;
    };
    let decode_seconds = t1.elapsed().as_secs_f64();
    let segments = split_segments(vocab, constraints, start_mode, &generated);
    Ok(Generation {
        tokens: generated,
        logprobs,
        segments,
        stop,
        prompt_tokens: prompt.len(),
        prefill_seconds,
        decode_seconds,
    })
}

/// `log softmax(logits)[id]`, in f64 (max-shifted; infinite logits masked by nobody here).
fn log_softmax_at(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l)));
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    logits.get(id as usize).map_or(f32::NEG_INFINITY, |&l| (f64::from(l) - max - sum.ln()) as f32)
}

/// Cuts generated ids into per-modality segments; `start` is the mode the prompt left (a
/// prompt ending in BOI makes the first generated ids an image).
pub fn split_segments(vocab: &Vocab, c: &Constraints, start: Mode, ids: &[u32]) -> Vec<GenSegment> {
    let offset = |m: Modality| vocab.modality(m).map_or(0, |v| v.offset);
    let mut out: Vec<GenSegment> = Vec::new();
    let mut cur: Option<GenSegment> = match start {
        Mode::Text => None,
        Mode::Image { .. } => Some(GenSegment { modality: Modality::Image, ids: Vec::new(), complete: false }),
        Mode::Speech { .. } => Some(GenSegment { modality: Modality::Speech, ids: Vec::new(), complete: false }),
    };
    let mut flush = |cur: &mut Option<GenSegment>, complete: bool| {
        if let Some(mut s) = cur.take() {
            s.complete = complete || s.modality == Modality::Text;
            if !s.ids.is_empty() || s.modality != Modality::Text {
                out.push(s);
            }
        }
    };
    for &id in ids {
        let m = vocab.modality_of(id);
        let is_marker =
            [c.eos, c.boi, c.eoi, c.bosp, c.eosp].contains(&id) || (!c.text.contains(&id) && m == Modality::Text);
        if is_marker {
            let closes = (id == c.eoi || id == c.eosp) && cur.as_ref().is_some_and(|s| s.modality != Modality::Text);
            flush(&mut cur, closes);
            if id == c.boi {
                cur = Some(GenSegment { modality: Modality::Image, ids: Vec::new(), complete: false });
            } else if id == c.bosp {
                cur = Some(GenSegment { modality: Modality::Speech, ids: Vec::new(), complete: false });
            }
            continue;
        }
        if cur.as_ref().is_some_and(|s| s.modality != m) {
            flush(&mut cur, false);
        }
        cur.get_or_insert_with(|| GenSegment { modality: m, ids: Vec::new(), complete: false })
            .ids
            .push(id - offset(m));
    }
    flush(&mut cur, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, ModelConfig};

    fn vocab() -> Vocab {
        Vocab::build(40, 16, 12, None)
    }

    #[test]
    fn sampler_is_deterministic_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32).collect();
        let all = std::slice::from_ref(&(0..50));
        let cfg = SamplingConfig { temperature: 1.0, top_k: 3, top_p: 1.0, seed: 9 };
        let draw = |cfg: &SamplingConfig| {
            let mut s = Sampler::new(cfg.clone()).expect("sampler");
            (0..200).map(|_| s.sample(&logits, all).expect("id")).collect::<Vec<u32>>()
        };
        let a = draw(&cfg);
        assert_eq!(a, draw(&cfg));
        // Ids with logit 6 are 6, 13, 20, ...; top-3 keeps the three smallest of them.
        assert!(a.iter().all(|id| [6, 13, 20].contains(id)), "{a:?}");
        assert!([6, 13, 20].iter().all(|id| a.contains(id)));
        assert_ne!(a, draw(&SamplingConfig { seed: 10, ..cfg.clone() }));
        let greedy = draw(&SamplingConfig { temperature: 0.0, ..cfg.clone() });
        assert!(greedy.iter().all(|&id| id == 6));
        // top-p with one dominant id keeps only it.
        let mut peaked = vec![0f32; 50];
        peaked[30] = 20.0;
        let mut s = Sampler::new(SamplingConfig { top_p: 0.5, ..cfg }).expect("sampler");
        assert!((0..50).all(|_| s.sample(&peaked, all) == Some(30)));
        assert!(Sampler::new(SamplingConfig { top_p: 0.0, ..SamplingConfig::default() }).is_err());
        assert!(Sampler::new(SamplingConfig { temperature: -1.0, ..SamplingConfig::default() }).is_err());
    }

    #[test]
    fn constrained_sampling_never_emits_a_non_image_id_inside_an_image() {
        // Logits that strongly prefer text ids, EOS and the other markers over image codes.
        let v = vocab();
        let c = Constraints::new(&v, 9, 6).expect("constraints");
        let img = c.image_range();
        let biased = |_: &[u32]| -> Result<Vec<f32>, TrainError> {
            Ok((0..v.total_size).map(|id| if img.contains(&id) { -8.0 } else { 12.0 }).collect())
        };
        let eoi = v.special("eoi").expect("eoi");
        let prompt = [v.special("bos").expect("bos"), 3, 4, c.boi()];
        for seed in 0..20 {
            let mut s = Sampler::new(SamplingConfig { temperature: 1.5, top_k: 0, top_p: 1.0, seed }).expect("sampler");
            let opts = GenerateOptions { max_tokens: 3, stop_after_image: true, ..GenerateOptions::default() };
            let g = generate_with(biased, &v, &c, &prompt, &mut s, &opts, |_| {}).expect("generate");
            // max_tokens (3) does not cut the image short: the grid is always full.
            assert_eq!(g.stop, StopReason::ImageDone);
            assert_eq!(g.tokens.len(), 10, "{:?}", g.tokens);
            assert!(g.tokens[..9].iter().all(|id| img.contains(id)), "non-image id inside the image: {:?}", g.tokens);
            assert_eq!(g.tokens[9], eoi);
            assert_eq!(g.segments.len(), 1);
            assert!(g.segments[0].modality == Modality::Image && g.segments[0].complete);
            assert!(g.segments[0].ids.len() == 9 && g.segments[0].ids.iter().all(|&i| i < 16));
            // Without stop_after_image the text after EOI follows the bias again: the model may
            // open another image (BOI is a favoured marker), and every image is still well formed.
            let opts = GenerateOptions { max_tokens: 60, stop_at_eos: false, ..GenerateOptions::default() };
            let g = generate_with(biased, &v, &c, &prompt, &mut s, &opts, |_| {}).expect("generate");
            let mut mode = Mode::Image { filled: 0 };
            for &id in &g.tokens {
                if let Mode::Image { filled } = mode {
                    if filled < 9 {
                        assert!(img.contains(&id), "non-image id {id} inside an image: {:?}", g.tokens);
                    } else {
                        assert_eq!(id, eoi);
                    }
                } else {
                    assert!(!img.contains(&id), "image code {id} outside an image");
                }
                mode = c.advance(mode, id);
            }
            assert!(g.tokens.iter().any(|id| !img.contains(id) && *id != eoi), "the text bias shows after EOI");
        }
    }

    #[test]
    fn speech_is_capped_and_cached_equals_uncached() {
        tch::set_num_threads(1);
        let v = vocab();
        let cfg = ModelConfig {
            arch: Arch::Dense,
            vocab_size: i64::from(v.total_size),
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            ffn_multiple_of: 16,
            ..ModelConfig::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new_seeded(&vs.root(), &cfg, 2).expect("model");
        let c = Constraints::new(&v, 4, 3).expect("constraints");
        let bosp = v.special("bosp").expect("bosp");
        let eosp = v.special("eosp").expect("eosp");
        let prompt = [v.special("bos").expect("bos"), 7, bosp];
        let run = |use_cache: bool| {
            let mut s = Sampler::new(SamplingConfig { temperature: 0.0, ..SamplingConfig::default() }).expect("s");
            let opts = GenerateOptions { max_tokens: 20, stop_at_eos: false, use_cache, ..GenerateOptions::default() };
            generate(&model, &v, &c, &prompt, &mut s, &opts, |_| {}).expect("generate")
        };
        let (a, b) = (run(true), run(false));
        assert_eq!(a.tokens, b.tokens, "greedy decoding must not depend on the cache");
        assert_eq!(a.tokens.len(), 20);
        // The first speech segment is closed by EOSP after at most 3 units.
        let close = a.tokens.iter().position(|&id| id == eosp).expect("EOSP forced");
        assert!(close <= 3, "{:?}", a.tokens);
        let sp = v.modality(Modality::Speech).expect("speech");
        assert!(a.tokens[..close].iter().all(|&id| id >= sp.offset && id < sp.offset + sp.vocab_size));
        assert_eq!(a.segments[0].modality, Modality::Speech);
        assert!(a.segments[0].complete);
    }

    #[test]
    fn loading_a_missing_run_names_the_path() {
        let err = load_run(Path::new("/nonexistent/run-xyz"), "cpu", None).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/run-xyz"), "{err}");
    }
}
