//! transformers `MimiModel` (Kyutai's neural speech codec, the tokenizer of Moshi) as a speech
//! tokenizer: mono audio at the model's rate → SEANet encoder → transformer → downsample →
//! split residual VQ, `K` codes per frame (12.5 frames/s for the released model), flattened
//! frame-major into the speech vocabulary. Decoding reverses the flattening and runs the
//! decoder back to audio.
//!
//! The network is candle-transformers' `mimi` (it reads transformers' weight names as they
//! are); this module maps transformers' `config.json` onto candle's config, refuses what
//! candle does not run, and owns the token layout:
//!
//! * id of codebook `q`'s code `c` = `q · codebook_size + c`, so the vocabulary is
//!   `K · codebook_size` and each codebook keeps its own ids;
//! * order: frame 0's `K` codes (codebook 0, the semantic one, first), then frame 1's, …
//!
//! A decoder handed a sequence that is not a whole number of frames drops the trailing partial
//! frame; a generated id in another codebook's range is read as its code `id mod
//! codebook_size` for the codebook its position belongs to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_transformers::models::mimi;
use motley_shards::{Modality, Segment, SegmentData, SegmentMeta};
use serde::{Deserialize, Serialize};

use super::{ModelFolder, var_builder};
use crate::error::{Result, TokenizerError};
use crate::speech::{AudioTokenizer, audio};

/// `kind` of a saved Mimi tokenizer file.
pub const KIND: &str = "mimi";

/// transformers' `MimiConfig` fields motley reads, with transformers' defaults for absent ones.
#[derive(Debug, Clone, Deserialize)]
struct MimiFields {
    sampling_rate: u32,
    audio_channels: usize,
    hidden_size: usize,
    num_filters: usize,
    num_residual_layers: usize,
    upsampling_ratios: Vec<usize>,
    kernel_size: usize,
    last_kernel_size: usize,
    residual_kernel_size: usize,
    dilation_growth_rate: usize,
    use_causal_conv: bool,
    pad_mode: String,
    compress: usize,
    trim_right_ratio: f64,
    codebook_size: usize,
    codebook_dim: usize,
    num_quantizers: usize,
    use_conv_shortcut: bool,
    vector_quantization_hidden_dimension: usize,
    num_semantic_quantizers: usize,
    upsample_groups: usize,
    num_hidden_layers: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: Option<usize>,
    hidden_act: String,
    max_position_embeddings: usize,
    norm_eps: f64,
    sliding_window: usize,
    layer_scale_initial_scale: f64,
    attention_bias: bool,
    /// transformers ≥ 5 (`rope_parameters.rope_theta`) or older (`rope_theta`).
    rope_parameters: Option<serde_json::Value>,
    rope_theta: Option<f64>,
    /// Older configs state it; newer ones derive it from the strides.
    frame_rate: Option<f64>,
}

/// transformers' `MimiConfig` defaults (5.x), under the keys `config.json` uses.
fn defaults() -> serde_json::Value {
    serde_json::json!({
        "sampling_rate": 24000, "audio_channels": 1, "hidden_size": 512, "num_filters": 64,
        "num_residual_layers": 1, "upsampling_ratios": [8, 6, 5, 4], "kernel_size": 7,
        "last_kernel_size": 3, "residual_kernel_size": 3, "dilation_growth_rate": 2,
        "use_causal_conv": true, "pad_mode": "constant", "compress": 2, "trim_right_ratio": 1.0,
        "codebook_size": 2048, "codebook_dim": 256, "num_quantizers": 32, "use_conv_shortcut": false,
        "vector_quantization_hidden_dimension": 256, "num_semantic_quantizers": 1, "upsample_groups": 512,
        "num_hidden_layers": 8, "intermediate_size": 2048, "num_attention_heads": 8,
        "num_key_value_heads": 8, "head_dim": null, "hidden_act": "gelu",
        "max_position_embeddings": 8000, "norm_eps": 1e-5, "sliding_window": 250,
        "layer_scale_initial_scale": 0.01, "attention_bias": false,
    })
}

impl MimiFields {
    fn parse(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let mut merged = defaults();
        if let (Some(m), Some(c)) = (merged.as_object_mut(), config.as_object()) {
            for (k, v) in c {
                if !v.is_null() || !m.contains_key(k) {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        serde_json::from_value(merged).map_err(|e| TokenizerError::model(path, format!("MimiModel config: {e}")))
    }

    fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// Samples per encoder frame (the SEANet strides' product).
    fn hop(&self) -> usize {
        self.upsampling_ratios.iter().product()
    }

    /// Code frames per second: transformers always downsamples the encoder's frames by 2.
    fn frame_rate(&self) -> f64 {
        self.sampling_rate as f64 / (2 * self.hop()) as f64
    }

    /// How many encoder frames back one frame's code, or one code frame's audio, can depend
    /// on: each transformer layer attends `sliding_window` frames back and itself (candle's
    /// and transformers' window), the SEANet convolutions reach back their receptive field,
    /// and the stride-2 down- and upsampling (kernel 4) two more frames each way.
    fn reach(&self) -> usize {
        let powers = |j: usize| self.dilation_growth_rate.saturating_pow(j as u32);
        let residual = |jump: usize| -> usize {
            (0..self.num_residual_layers)
                .map(|j| self.residual_kernel_size.saturating_sub(1).saturating_mul(powers(j)).saturating_mul(jump))
                .fold(0, usize::saturating_add)
        };
        // Encoder, in samples: first conv, per stride (reversed) residual convs and the
        // strided conv (kernel 2r), last conv.
        let (mut enc, mut jump) = (self.kernel_size.saturating_sub(1), 1usize);
        for &r in self.upsampling_ratios.iter().rev() {
            enc = enc.saturating_add(residual(jump)).saturating_add((2 * r).saturating_sub(1).saturating_mul(jump));
            jump = jump.saturating_mul(r);
        }
        enc = enc.saturating_add(self.last_kernel_size.saturating_sub(1).saturating_mul(jump));
        // Decoder, in samples: first conv at the frame rate, per stride a transposed conv
        // (kernel 2r: one input frame back) and residual convs at the new rate, last conv.
        let mut jump = self.hop();
        let mut dec = self.kernel_size.saturating_sub(1).saturating_mul(jump);
        for &r in &self.upsampling_ratios {
            dec = dec.saturating_add(jump);
            jump = (jump / r.max(1)).max(1);
            dec = dec.saturating_add(residual(jump));
        }
        dec = dec.saturating_add(self.last_kernel_size.saturating_sub(1));
        let convs = enc.max(dec).div_ceil(self.hop().max(1)) + 1;
        self.num_hidden_layers
            .saturating_mul(self.sliding_window.saturating_add(1))
            .saturating_add(convs)
            .saturating_add(4)
    }

    /// candle's config for these fields; anything candle's Mimi does not run is an error
    /// naming the field.
    fn to_candle(&self, codebooks: usize, path: &Path) -> Result<mimi::Config> {
        let bad = |msg: String| Err(TokenizerError::model(path, msg));
        if self.audio_channels != 1 {
            return bad(format!("audio_channels {} (only mono)", self.audio_channels));
        }
        if self.hidden_act != "gelu" {
            return bad(format!("hidden_act {:?} is not supported (only \"gelu\")", self.hidden_act));
        }
        let pad_mode = match self.pad_mode.as_str() {
            "constant" => mimi::conv::PadMode::Constant,
            "replicate" => mimi::conv::PadMode::Replicate,
            other => return bad(format!("pad_mode {other:?} is not supported (\"constant\" or \"replicate\")")),
        };
        let heads = self.num_attention_heads;
        if heads == 0
            || !self.hidden_size.is_multiple_of(heads)
            || self.head_dim.is_some_and(|d| d * heads != self.hidden_size)
        {
            return bad(format!(
                "head_dim {:?} × {heads} heads must equal hidden_size {}",
                self.head_dim, self.hidden_size
            ));
        }
        if self.num_key_value_heads == 0 || !heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "{heads} attention heads are not a multiple of {} key/value heads",
                self.num_key_value_heads
            ));
        }
        if self.codebook_dim != self.vector_quantization_hidden_dimension {
            return bad(format!(
                "codebook_dim {} differs from vector_quantization_hidden_dimension {} (candle's quantizer has one width)",
                self.codebook_dim, self.vector_quantization_hidden_dimension
            ));
        }
        if self.num_semantic_quantizers != 1 {
            return bad(format!("num_semantic_quantizers {} (only 1)", self.num_semantic_quantizers));
        }
        if self.upsample_groups != self.hidden_size {
            return bad(format!(
                "upsample_groups {} (only the depthwise upsampling, = hidden_size {})",
                self.upsample_groups, self.hidden_size
            ));
        }
        if (self.trim_right_ratio - 1.0).abs() > 1e-9 {
            return bad(format!("trim_right_ratio {} (only 1.0)", self.trim_right_ratio));
        }
        if (self.norm_eps - 1e-5).abs() > 1e-12 {
            return bad(format!("norm_eps {} (candle's Mimi uses 1e-5)", self.norm_eps));
        }
        // candle divides by `compress`, indexes the first transformer layer, and builds RoPE
        // tables from the period: zeros there panic inside candle.
        if self.compress == 0 || self.num_hidden_layers == 0 || self.max_position_embeddings == 0 {
            return bad("compress, num_hidden_layers and max_position_embeddings must be positive".into());
        }
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta >= 1.0) {
            return bad(format!("rope_theta {theta} must be a finite number >= 1"));
        }
        if self.use_conv_shortcut {
            return bad("use_conv_shortcut = true is not supported".into());
        }
        if self.codebook_size == 0 || self.num_quantizers == 0 || self.sampling_rate == 0 || self.hop() == 0 {
            return bad("codebook_size, num_quantizers, sampling_rate and upsampling_ratios must be positive".into());
        }
        if !(1..=self.num_quantizers).contains(&codebooks) {
            return Err(TokenizerError::config(
                "codebooks",
                format!("{codebooks} (the model has 1 to {} codebooks)", self.num_quantizers),
            ));
        }
        if !(self.sampling_rate as usize).is_multiple_of(self.hop()) {
            return bad(format!(
                "sampling_rate {} is not a multiple of the strides' product {}",
                self.sampling_rate,
                self.hop()
            ));
        }
        let frame_rate = self.frame_rate();
        if let Some(f) = self.frame_rate.filter(|f| (f - frame_rate).abs() > 1e-9) {
            return bad(format!("frame_rate {f} disagrees with sampling_rate / (2 × strides) = {frame_rate}"));
        }
        let seanet = mimi::seanet::Config {
            dimension: self.hidden_size,
            channels: 1,
            causal: self.use_causal_conv,
            n_filters: self.num_filters,
            n_residual_layers: self.num_residual_layers,
            activation: candle_nn::Activation::Elu(1.),
            compress: self.compress,
            dilation_base: self.dilation_growth_rate,
            disable_norm_outer_blocks: 0,
            final_activation: None,
            kernel_size: self.kernel_size,
            residual_kernel_size: self.residual_kernel_size,
            last_kernel_size: self.last_kernel_size,
            lstm: 0,
            norm: mimi::conv::Norm::WeightNorm,
            pad_mode,
            ratios: self.upsampling_ratios.clone(),
            true_skip: true,
        };
        let transformer = mimi::transformer::Config {
            d_model: self.hidden_size,
            num_heads: heads,
            num_layers: self.num_hidden_layers,
            causal: true,
            norm_first: true,
            bias_ff: false,
            bias_attn: self.attention_bias,
            layer_scale: Some(self.layer_scale_initial_scale),
            context: self.sliding_window,
            conv_kernel_size: 5,
            use_conv_bias: true,
            use_conv_block: false,
            cross_attention: false,
            max_period: self.rope_theta().round() as usize,
            gating: None,
            norm: mimi::NormType::LayerNorm,
            positional_embedding: mimi::transformer::PositionalEmbedding::Rope,
            dim_feedforward: self.intermediate_size,
            kv_repeat: heads / self.num_key_value_heads,
            conv_layout: true,
            max_seq_len: self.max_position_embeddings,
        };
        Ok(mimi::Config {
            channels: 1,
            sample_rate: self.sampling_rate as f64,
            frame_rate,
            renormalize: false,
            resample_method: mimi::encodec::ResampleMethod::Conv,
            seanet,
            transformer,
            quantizer_n_q: codebooks,
            quantizer_bins: self.codebook_size,
            quantizer_dim: self.codebook_dim,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    kind: String,
    version: u32,
    architecture: String,
    model: String,
    codebooks: usize,
    config: serde_json::Value,
}

/// A transformers `MimiModel` as an [`AudioTokenizer`] of flattened RVQ codes.
#[derive(Debug, Clone)]
pub struct MimiTokenizer {
    fields: MimiFields,
    codebooks: usize,
    raw_config: serde_json::Value,
    model: String,
    net: Arc<mimi::Model>,
    device: Device,
    weights: PathBuf,
}

impl MimiTokenizer {
    /// Loads a transformers model folder; `codebooks` (default: all the model's
    /// `num_quantizers`) keeps the first K, as Moshi keeps 8 of Mimi's 32.
    pub fn from_folder(dir: impl AsRef<Path>, codebooks: Option<usize>) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        folder.architecture()?;
        let model = folder.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Self::build(
            folder.config.clone(),
            &folder.config_path,
            &folder.weights_path,
            folder.tensors()?,
            model,
            codebooks,
        )
    }

    /// Loads a tokenizer file written by [`AudioTokenizer::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (header, tensors): (Header, _) = super::read_saved(path, KIND)?;
        Self::build(header.config, path, path, tensors, header.model, Some(header.codebooks))
    }

    fn build(
        raw_config: serde_json::Value,
        config_path: &Path,
        weights: &Path,
        tensors: std::collections::HashMap<String, Tensor>,
        model: String,
        codebooks: Option<usize>,
    ) -> Result<Self> {
        let fields = MimiFields::parse(&raw_config, config_path)?;
        let codebooks = codebooks.unwrap_or(fields.num_quantizers);
        let cfg = fields.to_candle(codebooks, config_path)?;
        let device = super::encoder_device()?;
        let net = super::candle_call(weights, "load", || mimi::Model::new(cfg, var_builder(tensors, &device)))?;
        Ok(MimiTokenizer {
            fields,
            codebooks,
            raw_config,
            model,
            net: Arc::new(net),
            device,
            weights: weights.to_path_buf(),
        })
    }

    /// The model folder's name it was imported from.
    pub fn model_name(&self) -> &str {
        &self.model
    }

    /// Codebooks per frame (K).
    pub fn codebooks(&self) -> usize {
        self.codebooks
    }

    /// Codes per codebook.
    pub fn codebook_size(&self) -> usize {
        self.fields.codebook_size
    }

    /// Frames per second (12.5 for the released Mimi).
    pub fn frames_per_second(&self) -> f64 {
        self.fields.frame_rate()
    }

    /// Longest input in samples one forward pass takes: the transformer's positions
    /// (`max_position_embeddings`) run at the encoder's frame rate. Longer clips are encoded
    /// in overlapping windows (see [`Self::encode_codes`]).
    pub fn max_samples(&self) -> usize {
        self.fields.max_position_embeddings.saturating_mul(self.fields.hop())
    }

    /// Codes `[K][frames]` of mono samples already at the model's rate.
    ///
    /// A clip of at most [`Self::max_samples`] is one forward pass, as in transformers. A longer
    /// one is cut into windows of `max_position_embeddings` encoder frames that overlap by the
    /// model's reach into the past ([`MimiFields::reach`]); each window's first frames, which
    /// saw the window's edge instead of the audio before it, are dropped. Mimi is causal and
    /// its attention is a sliding window, so every kept frame saw exactly what it sees in one
    /// pass over the whole clip (RoPE scores depend on relative positions only): the codes are
    /// transformers' codes of the whole clip up to rounding, the memory stays that of one window.
    pub fn encode_codes(&self, samples: &[f32]) -> Result<Vec<Vec<u32>>> {
        if samples.len() <= self.max_samples() {
            return self.encode_pass(samples);
        }
        let step = 2 * self.fields.hop(); // samples per code frame
        let seconds = samples.len() as f64 / self.fields.sampling_rate as f64;
        let mut codes: Vec<Vec<u32>> = vec![Vec::new(); self.codebooks];
        for (frames, drop) in self.window_plan(samples.len().div_ceil(step), seconds)? {
            let part = self.encode_pass(&samples[frames.start * step..(frames.end * step).min(samples.len())])?;
            for (all, got) in codes.iter_mut().zip(part) {
                all.extend_from_slice(got.get(drop..).unwrap_or_default());
            }
        }
        Ok(codes)
    }

    /// One forward pass of the encoder over at most [`Self::max_samples`] samples.
    fn encode_pass(&self, samples: &[f32]) -> Result<Vec<Vec<u32>>> {
        let run = || -> candle_core::Result<Vec<Vec<u32>>> {
            let x = Tensor::from_slice(samples, (1, 1, samples.len()), &self.device)?;
            // candle's modules keep streaming state behind `&mut`; a clone shares the weights.
            let mut net = (*self.net).clone();
            net.encode(&x)?.squeeze(0)?.to_vec2::<u32>()
        };
        super::candle_call(&self.weights, "encode", run)
    }

    /// The windows that cover `frames` code frames of input longer than one pass (`seconds`
    /// long, for the error): each a range of code frames to run and how many of its first
    /// frames to drop (they saw the window's edge, not the audio before it). Every frame is
    /// kept exactly once, in order.
    fn window_plan(&self, frames: usize, seconds: f64) -> Result<Vec<(std::ops::Range<usize>, usize)>> {
        let (window, overlap) = self.windows(seconds)?;
        let mut plan = Vec::new();
        let mut next = 0usize; // first code frame not yet kept
        loop {
            let start = next.saturating_sub(overlap);
            let end = (start + window).min(frames);
            plan.push((start..end, next - start));
            if end == frames {
                return Ok(plan);
            }
            next = end;
        }
    }

    /// Window length and overlap in code frames for input longer than one pass (`seconds`
    /// long, for the error): a window must keep at least one frame past its overlap.
    fn windows(&self, seconds: f64) -> Result<(usize, usize)> {
        let f = &self.fields;
        let window = f.max_position_embeddings / 2;
        let overlap = f.reach().div_ceil(2);
        if !f.use_causal_conv || window <= overlap {
            return Err(TokenizerError::config(
                "audio length",
                format!(
                    "{seconds:.1} s is longer than the model's {:.1} s ({} transformer positions), and {}",
                    self.max_samples() as f64 / f.sampling_rate as f64,
                    f.max_position_embeddings,
                    if f.use_causal_conv {
                        format!(
                            "a window of them cannot cover the {} frames each frame looks back \
                             ({} layers × sliding_window {}, and the convolutions)",
                            f.reach(),
                            f.num_hidden_layers,
                            f.sliding_window
                        )
                    } else {
                        "a non-causal model (use_causal_conv = false) cannot be cut into windows".into()
                    }
                ),
            ));
        }
        Ok((window, overlap))
    }

    /// Samples at the model's rate of codes `[K][frames]`; a sequence longer than one pass
    /// (`max_position_embeddings / 2` code frames) is decoded in overlapping windows, as
    /// [`Self::encode_codes`] encodes, since the decoder is causal with the same reach.
    pub fn decode_codes(&self, codes: &[Vec<u32>]) -> Result<Vec<f32>> {
        let frames = codes.first().map_or(0, Vec::len);
        if codes.len() != self.codebooks || codes.iter().any(|c| c.len() != frames) || frames == 0 {
            return Err(TokenizerError::config(
                "codes",
                format!("expected {} codebooks of equal, non-zero length", self.codebooks),
            ));
        }
        if let Some(c) = codes.iter().flatten().find(|&&c| c as usize >= self.fields.codebook_size) {
            return Err(TokenizerError::config(
                "codes",
                format!("code {c} outside the {}-code book", self.fields.codebook_size),
            ));
        }
        if 2 * frames <= self.fields.max_position_embeddings {
            return self.decode_pass(codes, 0..frames);
        }
        let step = 2 * self.fields.hop();
        let mut pcm = Vec::with_capacity(frames * step);
        for (range, drop) in self.window_plan(frames, frames as f64 / self.frames_per_second())? {
            let part = self.decode_pass(codes, range)?;
            pcm.extend_from_slice(part.get(drop * step..).unwrap_or_default());
        }
        Ok(pcm)
    }

    /// One forward pass of the decoder over code frames `range` (at most one pass long).
    fn decode_pass(&self, codes: &[Vec<u32>], range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let frames = range.len();
        let flat: Vec<u32> = codes.iter().flat_map(|c| c[range.clone()].iter().copied()).collect();
        let run = || -> candle_core::Result<Vec<f32>> {
            let c = Tensor::from_vec(flat, (1, self.codebooks, frames), &self.device)?;
            let mut net = (*self.net).clone();
            net.decode(&c)?.flatten_all()?.to_vec1::<f32>()
        };
        super::candle_call(&self.weights, "decode", run)
    }

    /// Frame-major flat ids (see the module docs) of codes `[K][frames]`.
    pub fn flatten(&self, codes: &[Vec<u32>]) -> Vec<u32> {
        let frames = codes.first().map_or(0, Vec::len);
        let bins = self.fields.codebook_size as u32;
        (0..frames).flat_map(|f| codes.iter().enumerate().map(move |(q, c)| q as u32 * bins + c[f])).collect()
    }

    /// Codes `[K][frames]` of frame-major flat ids; a trailing partial frame is dropped.
    pub fn unflatten(&self, ids: &[u32]) -> Vec<Vec<u32>> {
        let k = self.codebooks;
        let bins = self.fields.codebook_size as u32;
        let mut codes: Vec<Vec<u32>> = (0..k).map(|_| Vec::with_capacity(ids.len() / k)).collect();
        for frame in ids.chunks_exact(k) {
            for (q, &id) in frame.iter().enumerate() {
                codes[q].push(id % bins);
            }
        }
        codes
    }
}

impl AudioTokenizer for MimiTokenizer {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn vocab_size(&self) -> u32 {
        (self.codebooks * self.fields.codebook_size) as u32
    }

    fn frame_rate(&self) -> f32 {
        (self.frames_per_second() * self.codebooks as f64) as f32
    }

    fn sample_rate(&self) -> u32 {
        self.fields.sampling_rate
    }

    fn encode_samples(&self, samples: &[f32], sample_rate: u32, source: Option<&str>) -> Result<Segment> {
        let src = source.unwrap_or("<audio>");
        if samples.is_empty() {
            return Err(TokenizerError::AudioEmpty { source_name: src.into(), samples: 0, rate: sample_rate });
        }
        let audio = audio::Audio { samples: samples.to_vec(), sample_rate };
        let x = audio::resample(&audio, self.fields.sampling_rate, src)?;
        let codes = self.encode_codes(&x).map_err(|e| match e {
            TokenizerError::Config { what, msg } => TokenizerError::Config { what, msg: format!("{src}: {msg}") },
            other => other,
        })?;
        Ok(Segment::tokens(Modality::Speech, self.flatten(&codes)).with_meta(SegmentMeta {
            grid: None,
            frame_rate: Some(AudioTokenizer::frame_rate(self)),
            source: source.map(str::to_string),
        }))
    }

    fn decode_to_wav(&self, seg: &Segment) -> Result<Vec<u8>> {
        let src = seg.meta.source.as_deref();
        let SegmentData::Tokens(ids) = &seg.data else {
            return Err(TokenizerError::bad_segment(src, "Mimi needs discrete codes, got latent vectors"));
        };
        if seg.modality != Modality::Speech {
            return Err(TokenizerError::bad_segment(src, format!("not a speech segment ({})", seg.modality)));
        }
        if let Some(bad) = ids.iter().find(|&&u| u >= AudioTokenizer::vocab_size(self)) {
            return Err(TokenizerError::bad_segment(
                src,
                format!("id {bad} outside the {} codebooks × {} codes", self.codebooks, self.fields.codebook_size),
            ));
        }
        if ids.len() < self.codebooks {
            return Err(TokenizerError::bad_segment(
                src,
                format!("{} ids: less than one frame of {} codebooks", ids.len(), self.codebooks),
            ));
        }
        let pcm = self.decode_codes(&self.unflatten(ids)).map_err(|e| TokenizerError::bad_segment(src, e))?;
        audio::wav_bytes(&pcm, self.fields.sampling_rate)
    }

    fn save(&self, path: &Path) -> Result<()> {
        let header = Header {
            kind: KIND.into(),
            version: 1,
            architecture: "MimiModel".into(),
            model: self.model.clone(),
            codebooks: self.codebooks,
            config: self.raw_config.clone(),
        };
        let buf = std::fs::read(&self.weights).map_err(|e| TokenizerError::io("read", &self.weights, e))?;
        crate::store::save_raw(path, &header, &buf, &self.weights)
    }

    fn manifest_info(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "kind": KIND,
            "architecture": "MimiModel",
            "model": self.model,
            "codebooks": self.codebooks,
            "codebook_size": self.fields.codebook_size,
            "sample_rate": self.fields.sampling_rate,
            "frames_per_second": self.frames_per_second(),
            "order": "frame-major: id = codebook * codebook_size + code",
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_absent_fields_and_older_keys_are_read() {
        let f = MimiFields::parse(&serde_json::json!({"hidden_size": 32, "rope_theta": 5000.0}), Path::new("c.json"))
            .unwrap();
        assert_eq!(f.hidden_size, 32);
        assert_eq!(f.upsampling_ratios, vec![8, 6, 5, 4]);
        assert_eq!(f.rope_theta(), 5000.0);
        let f = MimiFields::parse(&serde_json::json!({"rope_parameters": {"rope_theta": 100.0}}), Path::new("c.json"))
            .unwrap();
        assert_eq!(f.rope_theta(), 100.0);
    }

    #[test]
    fn unsupported_settings_name_the_field() {
        for (cfg, want) in [
            (serde_json::json!({"pad_mode": "reflect"}), "pad_mode"),
            (serde_json::json!({"hidden_act": "silu"}), "hidden_act"),
            (serde_json::json!({"num_semantic_quantizers": 2}), "num_semantic_quantizers"),
            (serde_json::json!({"frame_rate": 25.0}), "frame_rate"),
            (serde_json::json!({"codebook_dim": 128}), "codebook_dim"),
        ] {
            let f = MimiFields::parse(&cfg, Path::new("c.json")).unwrap();
            let e = f.to_candle(8, Path::new("c.json")).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("c.json"), "{e}");
        }
        let f = MimiFields::parse(&serde_json::json!({}), Path::new("c.json")).unwrap();
        assert!(f.to_candle(33, Path::new("c.json")).unwrap_err().to_string().contains("codebooks"));
        assert_eq!(f.to_candle(8, Path::new("c.json")).unwrap().frame_rate, 12.5);
    }

    #[test]
    fn the_released_models_reach_sets_its_windows() {
        // 8 layers × (250 + 1) frames of attention, 9 frames of convolutions (the decoder's,
        // 7,156 samples, reach further than the encoder's 4,279), 4 of down/upsampling.
        let f = MimiFields::parse(&serde_json::json!({}), Path::new("c.json")).unwrap();
        assert_eq!(f.reach(), 8 * 251 + 9 + 4);
        // Windows of 4,000 code frames (320 s) overlapping by 1,011 (81 s).
        assert_eq!((f.max_position_embeddings / 2, f.reach().div_ceil(2)), (4000, 1011));
    }
}
