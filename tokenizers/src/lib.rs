//! motley-tokenizers: trainable tokenizers for text, images and speech, each saved to one file,
//! loaded back, and able to decode what it encodes so a person can see and hear what the
//! model sees.
//!
//! # The pieces
//!
//! | modality | type | file | segment |
//! |---|---|---|---|
//! | text | [`TextTokenizer`] (byte-level BPE, HF `tokenizers`) | `tokenizer.json` | `Tokens` |
//! | image, discrete | [`VqImageTokenizer`] (k-means++ VQ codebook) | `*.safetensors`, kind `vq` | `Tokens`, `meta.grid` |
//! | image, continuous | [`LatentImageTokenizer`] (patches, optional PCA, f16) | `*.safetensors`, kind `latent` | `Latent`, `meta.grid` |
//! | speech | [`SpeechTokenizer`] (log-mel k-means++ units, 25 Hz) | `*.safetensors`, kind `speech-units` | `Tokens`, `meta.frame_rate` |
//! | image, pretrained | [`pretrained::AutoencoderKlTokenizer`], [`pretrained::VqModelTokenizer`] (diffusers folders) | kind `autoencoder-kl` / `vq-model` | `Latent` / `Tokens` |
//! | speech, pretrained | [`pretrained::MimiTokenizer`] (transformers MimiModel folder) | kind `mimi` | `Tokens` (codebooks flattened frame-major) |
//!
//! Codebook files are safetensors whose metadata key `motley` holds a JSON header
//! (`kind`, geometry, normalization), so each file is self-describing.
//!
//! # For ingest
//!
//! ```no_run
//! use motley_tokenizers::{load_image, load_speech, load_text, AudioTokenizer, ImageTokenizer};
//! # fn main() -> motley_tokenizers::Result<()> {
//! let text = load_text("tok/tokenizer.json")?;
//! let ids: Vec<Vec<u32>> = text.encode_batch(&["hello", "world"])?; // parallel (rayon)
//! let image = load_image("tok/image.safetensors")?; // Box<dyn ImageTokenizer>, VQ or latent
//! let seg = image.encode_bytes(&std::fs::read("a.png").unwrap(), "a.png")?; // grid + source set
//! let png = image.decode_to_png(&seg)?;
//! let speech = load_speech("tok/speech.safetensors")?; // Box<dyn AudioTokenizer>: units or a codec
//! let seg = speech.encode_file("a.flac".as_ref())?; // frame_rate + source set
//! let wav = speech.decode_to_wav(&seg)?;
//! # Ok(()) }
//! ```
//!
//! Every method takes `&self`; all tokenizers are `Send + Sync`, so one instance can serve a
//! rayon pool. Single-item encodes run serially (parallelize over items);
//! [`TextTokenizer::encode_batch`] is itself parallel. Bad input never panics: it is a
//! [`TokenizerError`] naming the file (or `source`) and what was wrong.

pub mod error;
pub mod image;
pub mod kmeans;
pub mod pca;
pub mod pretrained;
pub mod speech;
pub mod store;
pub mod text;

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use motley_shards::{Modality, Segment};
use serde::Serialize;

pub use crate::error::{Result, TokenizerError};
pub use crate::image::{
    ImageTokenizer, LatentConfig, LatentFitSummary, LatentImageTokenizer, VqConfig, VqFitSummary, VqImageTokenizer,
    decode_image_bytes, load_image_tokenizer,
};
pub use crate::speech::{AudioTokenizer, MelConfig, SpeechConfig, SpeechFitSummary, SpeechTokenizer};
pub use crate::text::{TextTokenizer, TextTrainConfig, TextTrainSummary};

/// One human-viewable rendering of a decoded segment (`txt`, `png` or `wav`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// File extension to save it under.
    pub extension: &'static str,
    pub bytes: Vec<u8>,
}

/// What every modality's tokenizer can do once fitted: describe its id space, encode raw
/// bytes to a [`Segment`], render a segment for a person, and save itself.
pub trait ModalityTokenizer: Send + Sync + std::fmt::Debug {
    fn modality(&self) -> Modality;
    /// Discrete vocabulary size (local ids are `0..n`); 0 for continuous tokenizers.
    /// (Named apart from the per-modality `vocab_size` so both traits can be imported.)
    fn token_vocab_size(&self) -> u32;
    /// Vector dimension for continuous segments.
    fn vector_dim(&self) -> Option<u32> {
        None
    }
    /// Encodes raw input bytes (UTF-8 text, an image file, an audio file); `source` names them.
    fn encode_raw(&self, bytes: &[u8], source: &str) -> Result<Segment>;
    /// Decodes a segment into files a person can read, look at or listen to.
    fn render(&self, seg: &Segment) -> Result<Vec<Rendered>>;
    /// Writes the tokenizer file.
    fn save_to(&self, path: &Path) -> Result<()>;
}

/// Tokenizers that are fitted (trained) on a set of files.
pub trait Fit: Sized {
    type Config;
    type Summary: Serialize;
    fn fit(files: &[PathBuf], cfg: &Self::Config, progress: &ProgressBar) -> Result<(Self, Self::Summary)>;
    fn load(path: &Path) -> Result<Self>;
}

impl ModalityTokenizer for TextTokenizer {
    fn modality(&self) -> Modality {
        Modality::Text
    }
    fn token_vocab_size(&self) -> u32 {
        TextTokenizer::vocab_size(self)
    }
    fn encode_raw(&self, bytes: &[u8], source: &str) -> Result<Segment> {
        let text = std::str::from_utf8(bytes).map_err(|e| TokenizerError::Text {
            op: "encode",
            what: source.to_string(),
            msg: format!("not UTF-8 at byte offset {}", e.valid_up_to()),
        })?;
        self.encode_segment(text, Some(source))
    }
    fn render(&self, seg: &Segment) -> Result<Vec<Rendered>> {
        Ok(vec![Rendered { extension: "txt", bytes: self.decode_segment(seg)?.into_bytes() }])
    }
    fn save_to(&self, path: &Path) -> Result<()> {
        self.save(path)
    }
}

impl<T: ImageTokenizer + ?Sized> ModalityTokenizer for T {
    fn modality(&self) -> Modality {
        Modality::Image
    }
    fn token_vocab_size(&self) -> u32 {
        ImageTokenizer::vocab_size(self)
    }
    fn vector_dim(&self) -> Option<u32> {
        ImageTokenizer::latent_dim(self)
    }
    fn encode_raw(&self, bytes: &[u8], source: &str) -> Result<Segment> {
        self.encode_bytes(bytes, source)
    }
    fn render(&self, seg: &Segment) -> Result<Vec<Rendered>> {
        Ok(vec![Rendered { extension: "png", bytes: self.decode_to_png(seg)? }])
    }
    fn save_to(&self, path: &Path) -> Result<()> {
        self.save(path)
    }
}

/// A speech tokenizer behind the common trait (a fitted unit file or a neural codec).
#[derive(Debug)]
pub struct Speech(pub Box<dyn AudioTokenizer>);

impl ModalityTokenizer for Speech {
    fn modality(&self) -> Modality {
        Modality::Speech
    }
    fn token_vocab_size(&self) -> u32 {
        self.0.vocab_size()
    }
    fn encode_raw(&self, bytes: &[u8], source: &str) -> Result<Segment> {
        let hint = Path::new(source).extension().and_then(|e| e.to_str());
        self.0.encode_bytes(bytes, hint, source)
    }
    fn render(&self, seg: &Segment) -> Result<Vec<Rendered>> {
        self.0.render(seg)
    }
    fn save_to(&self, path: &Path) -> Result<()> {
        self.0.save(path)
    }
}

impl Fit for TextTokenizer {
    type Config = TextTrainConfig;
    type Summary = TextTrainSummary;
    fn fit(files: &[PathBuf], cfg: &Self::Config, _progress: &ProgressBar) -> Result<(Self, Self::Summary)> {
        TextTokenizer::train(files, cfg)
    }
    fn load(path: &Path) -> Result<Self> {
        TextTokenizer::from_file(path)
    }
}

impl Fit for VqImageTokenizer {
    type Config = VqConfig;
    type Summary = VqFitSummary;
    fn fit(files: &[PathBuf], cfg: &Self::Config, progress: &ProgressBar) -> Result<(Self, Self::Summary)> {
        VqImageTokenizer::fit_files(files, cfg, progress)
    }
    fn load(path: &Path) -> Result<Self> {
        VqImageTokenizer::load(path)
    }
}

impl Fit for LatentImageTokenizer {
    type Config = LatentConfig;
    type Summary = LatentFitSummary;
    fn fit(files: &[PathBuf], cfg: &Self::Config, progress: &ProgressBar) -> Result<(Self, Self::Summary)> {
        LatentImageTokenizer::fit_files(files, cfg, progress)
    }
    fn load(path: &Path) -> Result<Self> {
        LatentImageTokenizer::load(path)
    }
}

impl Fit for SpeechTokenizer {
    type Config = SpeechConfig;
    type Summary = SpeechFitSummary;
    fn fit(files: &[PathBuf], cfg: &Self::Config, progress: &ProgressBar) -> Result<(Self, Self::Summary)> {
        SpeechTokenizer::fit_files(files, cfg, progress)
    }
    fn load(path: &Path) -> Result<Self> {
        SpeechTokenizer::load(path)
    }
}

/// Opens a text tokenizer (`tokenizer.json`).
pub fn load_text(path: impl AsRef<Path>) -> Result<TextTokenizer> {
    TextTokenizer::from_file(path)
}

/// Opens an image tokenizer file, VQ or latent.
pub fn load_image(path: impl AsRef<Path>) -> Result<Box<dyn ImageTokenizer>> {
    load_image_tokenizer(path)
}

/// Opens a speech tokenizer: a fitted unit file, a saved codec file or a codec model folder.
pub fn load_speech(path: impl AsRef<Path>) -> Result<Box<dyn AudioTokenizer>> {
    speech::load_speech_tokenizer(path)
}

/// Opens any tokenizer file: JSON is text, safetensors is dispatched on its header's `kind`.
pub fn load_any(path: impl AsRef<Path>) -> Result<Box<dyn ModalityTokenizer>> {
    let path = path.as_ref();
    let head = if path.is_dir() {
        b'm'
    } else {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| TokenizerError::io("open", path, e))?;
        let mut b = [0u8; 1];
        let n = f.read(&mut b).map_err(|e| TokenizerError::io("read", path, e))?;
        if n == 0 {
            return Err(TokenizerError::bad_file(path, "file is empty"));
        }
        b[0]
    };
    if head == b'{' {
        return Ok(Box::new(load_text(path)?));
    }
    if let Some(t) = pretrained::load_modality(path)? {
        return Ok(t);
    }
    let loaded = store::load(path)?;
    match loaded.kind() {
        Some("vq") => Ok(Box::new(VqImageTokenizer::load(path)?)),
        Some("latent") => Ok(Box::new(LatentImageTokenizer::load(path)?)),
        Some("speech-units") => Ok(Box::new(Speech(Box::new(SpeechTokenizer::load(path)?)))),
        other => Err(TokenizerError::bad_file(path, format!("unknown tokenizer kind {other:?}"))),
    }
}
