//! Tokenizer set-up and record encoding: raw parts → `Document`s with the motley tokenizers.
//!
//! A batch of records is encoded together: image and audio parts in parallel on the rayon
//! pool, all text parts of the batch in one `encode_batch` call. A record whose part fails is
//! skipped whole and reported; the others are kept.

use std::path::{Path, PathBuf};

use motley_shards::{Document, Modality, Segment, SegmentMeta, Vocab};
use motley_tokenizers::{AudioTokenizer, ImageTokenizer, TextTokenizer, TokenizerError};
use rayon::prelude::*;

use crate::error::{Error, Reason, RecordError, Result};
use crate::recipe::{ImageMode, Needs, TokenizerPaths};
use crate::source::{Blob, RawPart, RawRecord, load_blob};

/// The loaded tokenizers of a run, and the files they came from.
#[derive(Debug)]
pub struct Tokenizers {
    pub text: Option<(TextTokenizer, PathBuf)>,
    pub image: Option<(Box<dyn ImageTokenizer>, PathBuf)>,
    pub speech: Option<(Box<dyn AudioTokenizer>, PathBuf)>,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer { path: path.to_path_buf(), message: e.to_string() }
}

/// `*.safetensors` files in `dir`, sorted (a tokenizer directory may hold several).
fn safetensors_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io("list tokenizer directory", dir, e))? {
        let p = e.map_err(|e| Error::io("list tokenizer directory", dir, e))?.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

fn load_image_from(path: &Path, mode: Option<ImageMode>) -> Result<(Box<dyn ImageTokenizer>, PathBuf)> {
    let want = |t: &dyn ImageTokenizer| match mode {
        None => true,
        Some(ImageMode::Vq) => t.latent_dim().is_none(),
        Some(ImageMode::Latent) => t.latent_dim().is_some(),
    };
    // A diffusers model folder (config.json + safetensors) is one tokenizer, not a directory of them.
    let model_folder = path.join("config.json").is_file();
    let candidates = if path.is_dir() && !model_folder { safetensors_in(path)? } else { vec![path.to_path_buf()] };
    let mut loaded = Vec::new();
    for c in &candidates {
        match motley_tokenizers::load_image(c) {
            Ok(t) if want(t.as_ref()) => loaded.push((t, c.clone())),
            Ok(_) => {}
            Err(e) if !path.is_dir() || model_folder => return Err(tok_err(c, e)),
            Err(_) => {}
        }
    }
    // Without an explicit mode a directory holding both prefers the discrete codebook.
    loaded.sort_by_key(|(t, _)| t.latent_dim().is_some());
    loaded.into_iter().next().ok_or_else(|| {
        tok_err(
            path,
            format!(
                "no {} image tokenizer found",
                match mode {
                    Some(ImageMode::Vq) => "VQ",
                    Some(ImageMode::Latent) => "latent",
                    None => "",
                }
            ),
        )
    })
}

fn load_speech_from(path: &Path) -> Result<(Box<dyn AudioTokenizer>, PathBuf)> {
    // A transformers codec folder (config.json + safetensors) is one tokenizer.
    if path.join("config.json").is_file() {
        return Ok((motley_tokenizers::load_speech(path).map_err(|e| tok_err(path, e))?, path.to_path_buf()));
    }
    let candidates = if path.is_dir() { safetensors_in(path)? } else { vec![path.to_path_buf()] };
    let mut last = None;
    for c in &candidates {
        match motley_tokenizers::load_speech(c) {
            Ok(t) => return Ok((t, c.clone())),
            Err(e) => last = Some(e.to_string()),
        }
    }
    Err(tok_err(path, last.unwrap_or_else(|| "no speech tokenizer (*.safetensors) found".into())))
}

impl Tokenizers {
    /// Loads the tokenizers the recipe needs; a needed one without a path is an error.
    pub fn load(paths: &TokenizerPaths, needs: Needs, image_mode: Option<ImageMode>) -> Result<Tokenizers> {
        let missing = |what: &str, flag: &str| {
            Error::Options(format!(
                "the sources need a {what} tokenizer: set tokenizers.{flag} in the recipe or pass --tokenizers DIR holding {}",
                match flag {
                    "text" => "text.json",
                    "image" => "image/ or image.safetensors",
                    _ => "speech/ or speech.safetensors",
                }
            ))
        };
        let text = match (&paths.text, needs.text) {
            (Some(p), _) => {
                let file = if p.is_dir() { p.join(crate::recipe::TEXT_TOKENIZER_FILE) } else { p.clone() };
                Some((motley_tokenizers::load_text(&file).map_err(|e| tok_err(&file, e))?, file))
            }
            (None, true) => return Err(missing("text", "text")),
            (None, false) => None,
        };
        let image = match (&paths.image, needs.image) {
            (Some(p), true) => Some(load_image_from(p, image_mode)?),
            (None, true) => return Err(missing("image", "image")),
            (_, false) => None,
        };
        let speech = match (&paths.speech, needs.speech) {
            (Some(p), true) => Some(load_speech_from(p)?),
            (None, true) => return Err(missing("speech", "speech")),
            (_, false) => None,
        };
        Ok(Tokenizers { text, image, speech })
    }

    /// The corpus vocabulary; `files` names each tokenizer as stored in the corpus.
    pub fn vocab(&self, files: &[(Modality, String)]) -> Vocab {
        let text = self.text.as_ref().map_or(0, |(t, _)| t.vocab_size());
        let image = self.image.as_ref().map_or(0, |(t, _)| t.vocab_size());
        let latent = self.image.as_ref().and_then(|(t, _)| t.latent_dim());
        let speech = self.speech.as_ref().map_or(0, |(t, _)| t.vocab_size());
        let mut v = Vocab::build(text, image, speech, latent);
        for m in &mut v.modalities {
            m.tokenizer = files.iter().find(|(fm, _)| *fm == m.modality).map(|(_, f)| f.clone());
        }
        v
    }

    /// The tokenizer files in use, by modality.
    pub fn files(&self) -> Vec<(Modality, PathBuf)> {
        let mut v = Vec::new();
        if let Some((_, p)) = &self.text {
            v.push((Modality::Text, p.clone()));
        }
        if let Some((_, p)) = &self.image {
            v.push((Modality::Image, p.clone()));
        }
        if let Some((_, p)) = &self.speech {
            v.push((Modality::Speech, p.clone()));
        }
        v
    }

    /// Encodes a batch of records, keeping their order. Call inside the pool that should do
    /// the work (`pool.install`).
    pub fn encode(&self, records: &[RawRecord]) -> Vec<Result<Document, RecordError>> {
        // 1. Media parts, in parallel; text parts are left as placeholders.
        let mut staged: Vec<Result<Vec<Option<Segment>>, RecordError>> =
            records.par_iter().map(|r| self.encode_media(r)).collect();
        // 2. All texts of the batch in one call.
        let mut texts: Vec<&str> = Vec::new();
        let mut slots: Vec<(usize, usize)> = Vec::new();
        for (ri, (r, st)) in records.iter().zip(&staged).enumerate() {
            if st.is_err() {
                continue;
            }
            for (pi, p) in r.parts.iter().enumerate() {
                if let RawPart::Text(t) = p {
                    texts.push(t);
                    slots.push((ri, pi));
                }
            }
        }
        if !texts.is_empty() {
            match &self.text {
                None => {
                    for &(ri, _) in &slots {
                        staged[ri] = Err(records[ri].error(Reason::Text, "a text part but no text tokenizer"));
                    }
                }
                Some((tok, _)) => {
                    let ids = match tok.encode_batch(&texts) {
                        Ok(ids) => ids.into_iter().map(Ok).collect::<Vec<_>>(),
                        // One bad text must not sink the batch: find it one by one.
                        Err(_) => texts.iter().map(|t| tok.encode(t)).collect(),
                    };
                    for (&(ri, pi), ids) in slots.iter().zip(ids) {
                        let Ok(parts) = &mut staged[ri] else { continue };
                        match ids {
                            Ok(ids) => parts[pi] = Some(Segment::tokens(Modality::Text, ids)),
                            Err(e) => staged[ri] = Err(records[ri].error(Reason::Text, e.to_string())),
                        }
                    }
                }
            }
        }
        staged
            .into_iter()
            .zip(records)
            .map(|(st, r)| {
                let segs: Vec<Segment> = st?.into_iter().flatten().filter(|s| !s.data.is_empty()).collect();
                if segs.is_empty() {
                    return Err(r.error(Reason::Empty, "no tokens"));
                }
                Ok(Document::new(segs))
            })
            .collect()
    }

    fn encode_media(&self, r: &RawRecord) -> Result<Vec<Option<Segment>>, RecordError> {
        let mut out = Vec::with_capacity(r.parts.len());
        for (pi, part) in r.parts.iter().enumerate() {
            let seg = match part {
                RawPart::Text(_) => None,
                RawPart::Image(blob) => {
                    let (tok, _) = self
                        .image
                        .as_ref()
                        .ok_or_else(|| r.error(Reason::Image, "an image part but no image tokenizer"))?;
                    let bytes = load_blob(blob).map_err(|(reason, e)| r.error(reason, format!("part {pi}: {e}")))?;
                    let seg = tok
                        .encode_bytes(&bytes, &blob.name())
                        .map_err(|e| r.error(reason_of(&e, Reason::Image), e.to_string()))?;
                    Some(with_source(seg, blob))
                }
                RawPart::Audio(blob) => {
                    let (tok, _) = self
                        .speech
                        .as_ref()
                        .ok_or_else(|| r.error(Reason::Audio, "an audio part but no speech tokenizer"))?;
                    let bytes = load_blob(blob).map_err(|(reason, e)| r.error(reason, format!("part {pi}: {e}")))?;
                    let name = blob.name();
                    let hint = Path::new(&name).extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
                    let seg = tok
                        .encode_bytes(&bytes, hint.as_deref(), &name)
                        .map_err(|e| r.error(reason_of(&e, Reason::Audio), e.to_string()))?;
                    Some(with_source(seg, blob))
                }
            };
            out.push(seg);
        }
        Ok(out)
    }
}

fn with_source(mut seg: Segment, blob: &Blob) -> Segment {
    seg.meta = SegmentMeta { source: Some(blob.name()), ..seg.meta };
    seg
}

/// Which `Reason` a tokenizer error counts under.
fn reason_of(e: &TokenizerError, default: Reason) -> Reason {
    match e {
        TokenizerError::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => Reason::MissingFile,
        TokenizerError::Io { .. } => Reason::Io,
        TokenizerError::ImageDecode { .. }
        | TokenizerError::ImageTooLarge { .. }
        | TokenizerError::ImageEmpty { .. } => Reason::Image,
        TokenizerError::AudioDecode { .. } | TokenizerError::AudioEmpty { .. } | TokenizerError::Resample { .. } => {
            Reason::Audio
        }
        TokenizerError::Text { .. } => Reason::Text,
        _ => default,
    }
}

/// Content hash of a record for exact-duplicate removal: part kinds, texts and media bytes.
/// A caption/transcript + media pair hashes the same whichever order was drawn for it.
pub fn content_hash(r: &RawRecord) -> Result<[u8; 16], RecordError> {
    let mut digests = Vec::with_capacity(r.parts.len());
    for part in &r.parts {
        let mut h = blake3::Hasher::new();
        match part {
            RawPart::Text(t) => {
                h.update(b"T");
                h.update(t.as_bytes());
            }
            RawPart::Image(b) | RawPart::Audio(b) => {
                h.update(if matches!(part, RawPart::Image(_)) { b"I" } else { b"A" });
                let bytes = load_blob(b).map_err(|(reason, e)| r.error(reason, e))?;
                h.update(&bytes);
            }
        }
        digests.push(*h.finalize().as_bytes());
    }
    let is_pair = r.parts.len() == 2 && r.parts.iter().filter(|p| matches!(p, RawPart::Text(_))).count() == 1;
    if is_pair {
        digests.sort_unstable();
    }
    let mut h = blake3::Hasher::new();
    for d in &digests {
        h.update(d);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    Ok(out)
}
