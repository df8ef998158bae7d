//! Speech: the [`AudioTokenizer`] trait ingest codes against, and the fitted units —
//! audio → mono 16 kHz → log-mel frames (25 Hz by default) → discrete units by nearest
//! k-means++ codeword (500 by default), optionally collapsing repeats. Decode for inspection:
//! units → codeword mel frames → spectrogram PNG, and audible WAV by Griffin-Lim. A neural
//! codec (`crate::pretrained::MimiTokenizer`) implements the same trait.

pub mod audio;
pub mod mel;

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use indicatif::ProgressBar;
use motley_shards::{Modality, Segment, SegmentData, SegmentMeta};
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use audio::Audio;
pub use mel::{MelConfig, MelFrontend};

use crate::error::{Result, TokenizerError};
use crate::kmeans::{self, Codebook, KMeansConfig};
use crate::store;

/// A speech tokenizer: audio → a [`Segment`] of discrete units in the speech vocabulary, and
/// back to audio a person can listen to. The fitted log-mel units ([`SpeechTokenizer`]) and a
/// pretrained neural codec (`crate::pretrained::MimiTokenizer`) both implement it.
pub trait AudioTokenizer: Send + Sync + std::fmt::Debug {
    /// The `kind` in the saved file's header (`"speech-units"`, `"mimi"`).
    fn kind(&self) -> &'static str;
    /// Discrete vocabulary size (local ids are `0..n`).
    fn vocab_size(&self) -> u32;
    /// Tokens per second of audio (for a codec with several codebooks: frames/s × codebooks).
    fn frame_rate(&self) -> f32;
    /// The rate audio is resampled to before encoding, and decoded at.
    fn sample_rate(&self) -> u32;
    /// Units of mono samples at `sample_rate` (resampled if needed); `source` names them.
    fn encode_samples(&self, samples: &[f32], sample_rate: u32, source: Option<&str>) -> Result<Segment>;
    /// Audible reconstruction as 16-bit WAV bytes.
    fn decode_to_wav(&self, seg: &Segment) -> Result<Vec<u8>>;
    /// Writes the tokenizer file.
    fn save(&self, path: &Path) -> Result<()>;
    /// What a corpus manifest records beside the tokenizer's file name (a pretrained model's
    /// name, codebooks and token order); `None` for the fitted units.
    fn manifest_info(&self) -> Option<serde_json::Value> {
        None
    }
    /// What a person gets for a segment: the WAV, and whatever else helps (a spectrogram).
    fn render(&self, seg: &Segment) -> Result<Vec<crate::Rendered>> {
        Ok(vec![crate::Rendered { extension: "wav", bytes: self.decode_to_wav(seg)? }])
    }

    /// Decodes in-memory audio (WAV, FLAC, MP3, Ogg Vorbis; `hint` is an extension like `wav`)
    /// and encodes it.
    fn encode_bytes(&self, bytes: &[u8], hint: Option<&str>, source: &str) -> Result<Segment> {
        let a = audio::decode_bytes(bytes, hint, source)?;
        self.encode_samples(&a.samples, a.sample_rate, Some(source))
    }
    /// Decodes and encodes an audio file.
    fn encode_file(&self, path: &Path) -> Result<Segment> {
        let a = audio::decode_file(path)?;
        self.encode_samples(&a.samples, a.sample_rate, Some(&path.display().to_string()))
    }
    /// Encodes many files in parallel on the rayon pool; one result per file, in order.
    fn encode_files(&self, paths: &[PathBuf]) -> Vec<Result<Segment>> {
        paths.par_iter().map(|p| self.encode_file(p)).collect()
    }
}

/// Opens a speech tokenizer: a fitted unit file, a saved codec file, or a transformers codec
/// model folder (`config.json` + `model.safetensors`, MimiModel).
pub fn load_speech_tokenizer(path: impl AsRef<Path>) -> Result<Box<dyn AudioTokenizer>> {
    let path = path.as_ref();
    if let Some(t) = crate::pretrained::load_speech(path)? {
        return Ok(t);
    }
    Ok(Box::new(SpeechTokenizer::load(path)?))
}

/// How to fit speech units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechConfig {
    pub mel: MelConfig,
    /// Number of discrete units.
    pub units: u32,
    /// Collapse runs of the same unit into one (the segment then loses exact timing).
    pub collapse_repeats: bool,
    /// At most this many frames are clustered (a seeded random subset).
    pub max_frames: usize,
    pub max_iter: usize,
    pub seed: u64,
    /// Skip undecodable training files (logged) instead of failing.
    pub skip_bad: bool,
}

impl Default for SpeechConfig {
    fn default() -> Self {
        SpeechConfig {
            mel: MelConfig::default(),
            units: 500,
            collapse_repeats: false,
            max_frames: 500_000,
            max_iter: 25,
            seed: 0,
            skip_bad: false,
        }
    }
}

/// What a fit did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechFitSummary {
    pub units: u32,
    pub frame_rate: f32,
    pub files: usize,
    pub skipped_files: usize,
    pub audio_seconds: f64,
    pub frames: usize,
    /// Mean squared frame quantization error in the normalized log-mel space.
    pub quantization_error: f64,
    /// `quantization_error` divided by the frames' total variance.
    pub relative_error: f64,
    pub empty_units: usize,
    pub iterations: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SpeechHeader {
    kind: String,
    version: u32,
    mel: MelConfig,
    units: u32,
    collapse_repeats: bool,
    seed: u64,
}

/// Discrete speech units over log-mel frames.
#[derive(Debug, Clone)]
pub struct SpeechTokenizer {
    frontend: MelFrontend,
    /// Per-mel-band mean and standard deviation (features are normalized before clustering).
    mean: Vec<f32>,
    std: Vec<f32>,
    codebook: Codebook,
    collapse_repeats: bool,
    seed: u64,
}

impl SpeechTokenizer {
    /// Fits units on audio files (decoded and featurized in parallel).
    pub fn fit_files(
        paths: &[PathBuf],
        cfg: &SpeechConfig,
        progress: &ProgressBar,
    ) -> Result<(Self, SpeechFitSummary)> {
        let start = Instant::now();
        let frontend = MelFrontend::new(&cfg.mel)?;
        if paths.is_empty() {
            return Err(TokenizerError::NoData { what: "speech units", msg: "no audio files given".into() });
        }
        progress.set_length(paths.len() as u64);
        progress.set_position(0);
        progress.set_message("decoding audio");
        let feats: Vec<Result<(Vec<f32>, f64)>> = paths
            .par_iter()
            .map(|p| {
                let src = p.display().to_string();
                let r = audio::decode_file(p).and_then(|a| {
                    let s = audio::resample(&a, cfg.mel.sample_rate, &src)?;
                    Ok((frontend.log_mel(&s), a.seconds()))
                });
                progress.inc(1);
                r
            })
            .collect();
        let mut all = Vec::new();
        let (mut files, mut skipped, mut secs) = (0usize, 0usize, 0f64);
        for r in feats {
            match r {
                Ok((f, s)) => {
                    all.extend_from_slice(&f);
                    files += 1;
                    secs += s;
                }
                Err(e) if cfg.skip_bad => {
                    tracing::warn!("skipping {e}");
                    skipped += 1;
                }
                Err(e) => return Err(e),
            }
        }
        if all.is_empty() {
            return Err(TokenizerError::NoData {
                what: "speech units",
                msg: format!("none of the {} files decoded", paths.len()),
            });
        }
        let (tok, rep) = Self::fit_features(&all, cfg, progress)?;
        let summary = SpeechFitSummary {
            files,
            skipped_files: skipped,
            audio_seconds: secs,
            seconds: start.elapsed().as_secs_f64(),
            ..rep
        };
        Ok((tok, summary))
    }

    /// Fits units on precomputed log-mel features (`frames × n_mels`).
    pub fn fit_features(
        features: &[f32],
        cfg: &SpeechConfig,
        progress: &ProgressBar,
    ) -> Result<(Self, SpeechFitSummary)> {
        let start = Instant::now();
        let frontend = MelFrontend::new(&cfg.mel)?;
        let d = cfg.mel.n_mels;
        if cfg.units < 2 || cfg.units > 65_536 {
            return Err(TokenizerError::config("unit count", format!("{} (allowed 2..=65536)", cfg.units)));
        }
        let n = features.len() / d;
        // Normalization statistics (sequential f64: deterministic).
        let mut mean = vec![0f64; d];
        let mut sq = vec![0f64; d];
        for f in features.chunks_exact(d) {
            for ((m, s), &v) in mean.iter_mut().zip(sq.iter_mut()).zip(f) {
                *m += v as f64;
                *s += v as f64 * v as f64;
            }
        }
        let nf = n.max(1) as f64;
        let mean_f: Vec<f32> = mean.iter().map(|m| (m / nf) as f32).collect();
        let std_f: Vec<f32> =
            mean.iter().zip(&sq).map(|(m, s)| ((s / nf - (m / nf).powi(2)).max(0.0).sqrt().max(1e-3)) as f32).collect();
        let mut data: Vec<f32> = Vec::with_capacity(features.len().min(cfg.max_frames * d));
        let mut push = |f: &[f32]| {
            for ((v, m), s) in f.iter().zip(&mean_f).zip(&std_f) {
                data.push((v - m) / s);
            }
        };
        if n > cfg.max_frames {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5bee);
            let mut idx = rand::seq::index::sample(&mut rng, n, cfg.max_frames).into_vec();
            idx.sort_unstable();
            for i in idx {
                push(&features[i * d..(i + 1) * d]);
            }
        } else {
            features.chunks_exact(d).for_each(&mut push);
        }
        let mut kcfg = KMeansConfig::new(cfg.units as usize, cfg.seed);
        kcfg.max_iter = cfg.max_iter;
        let (codebook, r) = kmeans::fit(&data, d, &kcfg, "speech units", progress)?;
        let tok = SpeechTokenizer {
            frontend,
            mean: mean_f,
            std: std_f,
            codebook,
            collapse_repeats: cfg.collapse_repeats,
            seed: cfg.seed,
        };
        let summary = SpeechFitSummary {
            units: cfg.units,
            frame_rate: cfg.mel.frame_rate(),
            files: 0,
            skipped_files: 0,
            audio_seconds: n as f64 / cfg.mel.frame_rate() as f64,
            frames: n,
            quantization_error: r.inertia,
            relative_error: if r.total_variance > 0.0 { r.inertia / r.total_variance } else { 0.0 },
            empty_units: r.empty_codewords,
            iterations: r.iterations,
            seconds: start.elapsed().as_secs_f64(),
        };
        Ok((tok, summary))
    }

    pub fn mel_config(&self) -> &MelConfig {
        self.frontend.config()
    }

    /// Units per second (before any collapse).
    pub fn frame_rate(&self) -> f32 {
        self.frontend.config().frame_rate()
    }

    pub fn vocab_size(&self) -> u32 {
        self.codebook.len() as u32
    }

    pub fn collapses_repeats(&self) -> bool {
        self.collapse_repeats
    }

    /// Log-mel features of mono audio at the tokenizer's sample rate.
    pub fn features(&self, samples_16k: &[f32]) -> Vec<f32> {
        self.frontend.log_mel(samples_16k)
    }

    /// Nearest unit per feature frame (serial: callers parallelize over files).
    pub fn units_of(&self, log_mel: &[f32]) -> Vec<u32> {
        let d = self.mean.len();
        let mut x = vec![0f32; d];
        let mut out = Vec::with_capacity(log_mel.len() / d);
        for f in log_mel.chunks_exact(d) {
            for (((o, v), m), s) in x.iter_mut().zip(f).zip(&self.mean).zip(&self.std) {
                *o = (v - m) / s;
            }
            let u = self.codebook.nearest(&x).0;
            if !(self.collapse_repeats && out.last() == Some(&u)) {
                out.push(u);
            }
        }
        out
    }

    fn check_units<'a>(&self, seg: &'a Segment) -> Result<&'a [u32]> {
        let src = seg.meta.source.as_deref();
        let SegmentData::Tokens(ids) = &seg.data else {
            return Err(TokenizerError::bad_segment(src, "speech segments hold discrete units, got latent vectors"));
        };
        if seg.modality != Modality::Speech {
            return Err(TokenizerError::bad_segment(src, format!("not a speech segment ({})", seg.modality)));
        }
        if let Some(bad) = ids.iter().find(|&&u| u as usize >= self.codebook.len()) {
            return Err(TokenizerError::bad_segment(
                src,
                format!("unit {bad} outside the {} units", self.codebook.len()),
            ));
        }
        if ids.is_empty() {
            return Err(TokenizerError::bad_segment(src, "no units"));
        }
        Ok(ids)
    }

    /// Log-mel frames (`units × n_mels`) of each unit's codeword.
    pub fn decode_to_mel(&self, seg: &Segment) -> Result<Vec<f32>> {
        let ids = self.check_units(seg)?;
        Ok(self.units_to_mel(ids))
    }

    fn units_to_mel(&self, ids: &[u32]) -> Vec<f32> {
        let d = self.mean.len();
        let mut out = Vec::with_capacity(ids.len() * d);
        for &u in ids {
            if let Some(w) = self.codebook.word(u as usize) {
                out.extend(w.iter().zip(&self.mean).zip(&self.std).map(|((v, m), s)| v * s + m));
            }
        }
        out
    }

    /// Audible reconstruction: codeword mel frames → Griffin-Lim → 16-bit WAV bytes.
    pub fn decode_to_wav(&self, seg: &Segment) -> Result<Vec<u8>> {
        let mel = self.decode_to_mel(seg)?;
        let wave = self.frontend.griffin_lim(&mel, 32, self.seed);
        audio::wav_bytes(&wave, self.frontend.config().sample_rate)
    }

    /// Spectrogram PNG of the units' codeword mel frames (time → right, frequency ↑).
    pub fn spectrogram_png(&self, seg: &Segment) -> Result<Vec<u8>> {
        let mel = self.decode_to_mel(seg)?;
        crate::image::png_bytes(&spectrogram_image(&mel, self.mean.len()))
    }

    /// Spectrogram PNG of an audio file's own log-mel features (to compare with the units').
    pub fn audio_spectrogram_png(&self, path: impl AsRef<Path>) -> Result<Vec<u8>> {
        let path = path.as_ref();
        let a = audio::decode_file(path)?;
        let s = audio::resample(&a, self.frontend.config().sample_rate, &path.display().to_string())?;
        crate::image::png_bytes(&spectrogram_image(&self.frontend.log_mel(&s), self.mean.len()))
    }

    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let h = SpeechHeader {
            kind: "speech-units".into(),
            version: 1,
            mel: self.frontend.config().clone(),
            units: self.codebook.len() as u32,
            collapse_repeats: self.collapse_repeats,
            seed: self.seed,
        };
        let d = self.mean.len();
        store::save(
            path,
            &h,
            &[
                store::Tensor { name: "codebook", shape: vec![self.codebook.len(), d], data: self.codebook.words() },
                store::Tensor { name: "mean", shape: vec![d], data: &self.mean },
                store::Tensor { name: "std", shape: vec![d], data: &self.std },
            ],
        )
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut loaded = store::load(path)?;
        if loaded.kind() != Some("speech-units") {
            return Err(TokenizerError::bad_file(
                path,
                format!("expected a speech unit tokenizer, found kind {:?}", loaded.kind()),
            ));
        }
        let h: SpeechHeader = loaded.header_as(path)?;
        let frontend = MelFrontend::new(&h.mel).map_err(|e| TokenizerError::bad_file(path, e))?;
        let d = h.mel.n_mels;
        let words = loaded.take(path, "codebook", &[h.units as usize, d])?;
        let mean = loaded.take(path, "mean", &[d])?;
        let std = loaded.take(path, "std", &[d])?;
        if std.iter().any(|s| *s <= 0.0) {
            return Err(TokenizerError::bad_file(path, "non-positive feature standard deviation"));
        }
        let codebook = Codebook::new(d, words).map_err(|e| TokenizerError::bad_file(path, e))?;
        Ok(SpeechTokenizer { frontend, mean, std, codebook, collapse_repeats: h.collapse_repeats, seed: h.seed })
    }
}

impl AudioTokenizer for SpeechTokenizer {
    fn kind(&self) -> &'static str {
        "speech-units"
    }
    fn vocab_size(&self) -> u32 {
        SpeechTokenizer::vocab_size(self)
    }
    fn frame_rate(&self) -> f32 {
        SpeechTokenizer::frame_rate(self)
    }
    fn sample_rate(&self) -> u32 {
        self.frontend.config().sample_rate
    }
    fn encode_samples(&self, samples: &[f32], sample_rate: u32, source: Option<&str>) -> Result<Segment> {
        let src = source.unwrap_or("<audio>");
        if samples.is_empty() {
            return Err(TokenizerError::AudioEmpty { source_name: src.into(), samples: 0, rate: sample_rate });
        }
        let audio = Audio { samples: samples.to_vec(), sample_rate };
        let s = audio::resample(&audio, self.frontend.config().sample_rate, src)?;
        let units = self.units_of(&self.frontend.log_mel(&s));
        Ok(Segment::tokens(Modality::Speech, units).with_meta(SegmentMeta {
            grid: None,
            frame_rate: Some(SpeechTokenizer::frame_rate(self)),
            source: source.map(str::to_string),
        }))
    }
    fn decode_to_wav(&self, seg: &Segment) -> Result<Vec<u8>> {
        SpeechTokenizer::decode_to_wav(self, seg)
    }
    fn save(&self, path: &Path) -> Result<()> {
        SpeechTokenizer::save(self, path)
    }
    fn render(&self, seg: &Segment) -> Result<Vec<crate::Rendered>> {
        Ok(vec![
            crate::Rendered { extension: "wav", bytes: SpeechTokenizer::decode_to_wav(self, seg)? },
            crate::Rendered { extension: "png", bytes: self.spectrogram_png(seg)? },
        ])
    }
}

/// Pixels per frame in spectrograms: wide enough that short clips stay readable (≥ 480 px).
pub fn spectrogram_px_per_frame(frames: usize) -> u32 {
    (480u32.div_ceil(frames.max(1) as u32)).clamp(4, 32)
}

/// Renders log-mel frames as a colour image (time → right, frequency ↑, 80 dB range).
pub fn spectrogram_image(log_mel: &[f32], n_mels: usize) -> RgbImage {
    let frames = log_mel.len() / n_mels.max(1);
    let (sx, sy) = (spectrogram_px_per_frame(frames), 2u32);
    let mut img = RgbImage::new((frames as u32 * sx).max(1), n_mels as u32 * sy);
    let max = log_mel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // 80 dB of power is ln(10^8) in natural-log units.
    let range = 8.0 * std::f32::consts::LN_10;
    for t in 0..frames {
        for m in 0..n_mels {
            let v = ((log_mel[t * n_mels + m] - (max - range)) / range).clamp(0.0, 1.0);
            let c = colormap(v);
            for dx in 0..sx {
                for dy in 0..sy {
                    let y = (n_mels - 1 - m) as u32 * sy + dy;
                    img.put_pixel(t as u32 * sx + dx, y, image::Rgb(c));
                }
            }
        }
    }
    img
}

/// A magma-like ramp: black → purple → orange → pale yellow.
fn colormap(v: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] =
        [[0.0, 0.0, 0.02], [0.32, 0.07, 0.50], [0.72, 0.21, 0.47], [0.99, 0.56, 0.25], [0.99, 0.99, 0.75]];
    let x = v.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let a = x - i as f32;
    let mut out = [0u8; 3];
    for c in 0..3 {
        out[c] = ((STOPS[i][c] * (1.0 - a) + STOPS[i + 1][c] * a) * 255.0).round() as u8;
    }
    out
}
