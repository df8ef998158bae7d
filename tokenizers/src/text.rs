//! Text: byte-level BPE through the Hugging Face `tokenizers` crate — train from text files,
//! save and load `tokenizer.json` (interchangeable with HF's Python library), parallel batch
//! encoding and decoding.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use motley_shards::{Modality, Segment, SegmentMeta};
use serde::{Deserialize, Serialize};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Result, TokenizerError};

/// How to train a byte-level BPE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextTrainConfig {
    /// Final vocabulary size, including the 256 byte symbols and the special tokens.
    pub vocab_size: u32,
    /// Pairs seen fewer times than this are never merged.
    pub min_frequency: u64,
    /// Reserved special tokens, given the first ids (0, 1, ...) in this order.
    pub special_tokens: Vec<String>,
    /// Show HF's own training progress bar on stderr.
    pub show_progress: bool,
}

impl Default for TextTrainConfig {
    fn default() -> Self {
        TextTrainConfig {
            vocab_size: 8192,
            min_frequency: 2,
            special_tokens: vec!["<|endoftext|>".to_string()],
            show_progress: false,
        }
    }
}

/// What training produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextTrainSummary {
    pub vocab_size: u32,
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// A byte-level BPE text tokenizer. Cheap to share across threads (`&self` everywhere).
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Where it was loaded from, for error messages.
    origin: String,
}

fn text_err(op: &'static str, what: impl std::fmt::Display, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Text { op, what: what.to_string(), msg: e.to_string() }
}

/// A call into HF `tokenizers` on a file someone else wrote: its error or its panic (the crate
/// asserts on some inconsistent files) as this tokenizer's error.
fn guarded<T, E: std::fmt::Display>(
    op: &'static str,
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> Result<T> {
    match crate::error::catch_panic(f) {
        Ok(r) => r.map_err(|e| text_err(op, what, e)),
        Err(msg) => Err(text_err(op, what, format!("the tokenizers crate panicked: {msg}"))),
    }
}

/// With a `continuing_subword_prefix`, HF's BPE builder strips the prefix's byte length from
/// each merge's second token without checking that it starts with the prefix: a shorter token
/// underflows, and one that does not start with it is cut inside a character and read as
/// UTF-8 unchecked. Refuse such a file before the builder sees it.
fn check_bpe_merges(json: &[u8]) -> std::result::Result<(), String> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(json) else {
        return Ok(()); // not JSON: the HF parser reports it
    };
    let model = &doc["model"];
    let Some(prefix) = model["continuing_subword_prefix"].as_str().filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let Some(merges) = model["merges"].as_array() else { return Ok(()) };
    for (i, m) in merges.iter().enumerate() {
        let second = match m {
            serde_json::Value::String(s) => s.split_once(' ').map(|(_, b)| b),
            serde_json::Value::Array(a) => a.get(1).and_then(|b| b.as_str()),
            _ => None,
        };
        if let Some(b) = second.filter(|b| !b.starts_with(prefix)) {
            return Err(format!(
                "merge {i}: {b:?} does not start with the model's continuing_subword_prefix {prefix:?}"
            ));
        }
    }
    Ok(())
}

impl TextTokenizer {
    /// Trains a byte-level BPE on UTF-8 text files (one or many; lines are the unit HF reads).
    pub fn train(files: &[PathBuf], cfg: &TextTrainConfig) -> Result<(Self, TextTrainSummary)> {
        let start = std::time::Instant::now();
        if files.is_empty() {
            return Err(TokenizerError::NoData { what: "text tokenizer", msg: "no training files given".into() });
        }
        let min_vocab = 256 + cfg.special_tokens.len() as u32;
        if cfg.vocab_size < min_vocab {
            return Err(TokenizerError::config(
                "text vocabulary size",
                format!("{} is below the 256 byte symbols plus {} specials", cfg.vocab_size, cfg.special_tokens.len()),
            ));
        }
        let mut bytes = 0u64;
        for f in files {
            let md = std::fs::metadata(f).map_err(|e| TokenizerError::io("read", f, e))?;
            if !md.is_file() {
                return Err(TokenizerError::io(
                    "read",
                    f,
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
                ));
            }
            // HF reads lines as UTF-8 and fails without naming the file; check first.
            let raw = std::fs::read(f).map_err(|e| TokenizerError::io("read", f, e))?;
            if let Err(e) = std::str::from_utf8(&raw) {
                return Err(text_err("train on", f.display(), format!("not UTF-8 at byte offset {}", e.valid_up_to())));
            }
            bytes += md.len();
        }
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let specials: Vec<AddedToken> = cfg.special_tokens.iter().map(|s| AddedToken::from(s.clone(), true)).collect();
        let trainer = BpeTrainerBuilder::new()
            .show_progress(cfg.show_progress)
            .vocab_size(cfg.vocab_size as usize)
            .min_frequency(cfg.min_frequency)
            .special_tokens(specials)
            .initial_alphabet(alphabet)
            .build();
        let mut trainer = TrainerWrapper::from(trainer);
        let mut tk = Tokenizer::new(BPE::default());
        // GPT-2 style: byte-level pre-tokenization without a prefix space, byte-level decoding.
        tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tk.with_decoder(Some(ByteLevel::default()));
        tk.with_post_processor(Some(ByteLevel::new(false, true, true)));
        let names: Vec<String> = files.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        tk.train_from_files(&mut trainer, names)
            .map_err(|e| text_err("train on", format!("{} files", files.len()), e))?;
        let t = TextTokenizer { inner: tk, origin: "trained".into() };
        let summary = TextTrainSummary {
            vocab_size: t.vocab_size(),
            files: files.len(),
            bytes,
            seconds: start.elapsed().as_secs_f64(),
        };
        Ok((t, summary))
    }

    /// Loads a `tokenizer.json` (written by this crate or by HF's Python library).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read(path).map_err(|e| TokenizerError::io("read", path, e))?;
        Self::from_bytes(&json, &path.display().to_string())
    }

    /// Parses `tokenizer.json` contents; `origin` names them in errors.
    pub fn from_bytes(json: &[u8], origin: &str) -> Result<Self> {
        check_bpe_merges(json).map_err(|e| text_err("load", origin, e))?;
        let inner = guarded("load", origin, || Tokenizer::from_bytes(json))?;
        Ok(TextTokenizer { inner, origin: origin.to_string() })
    }

    /// Writes `tokenizer.json` (pretty-printed).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TokenizerError::io("create directory", dir, e))?;
        }
        self.inner.save(path, true).map_err(|e| text_err("save", path.display(), e))
    }

    /// Vocabulary size including added (special) tokens: local ids are in `[0, vocab_size)`.
    pub fn vocab_size(&self) -> u32 {
        self.inner.get_vocab_size(true) as u32
    }

    /// Id of a token (e.g. a reserved special), if present.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes one text (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = guarded("encode with", &self.origin, || self.inner.encode_fast(text, false))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes many texts in parallel on the rayon pool (no special tokens added).
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encs = guarded("encode with", &self.origin, || self.inner.encode_batch_fast(texts.to_vec(), false))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Encodes one text as a text [`Segment`] with `source` recorded in its metadata.
    pub fn encode_segment(&self, text: &str, source: Option<&str>) -> Result<Segment> {
        let ids = self.encode(text)?;
        Ok(Segment::tokens(Modality::Text, ids)
            .with_meta(SegmentMeta { source: source.map(str::to_string), ..SegmentMeta::default() }))
    }

    /// Decodes ids back to text (specials kept so a person sees them).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let v = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i >= v) {
            return Err(TokenizerError::bad_segment(None, format!("text id {bad} is outside the vocabulary of {v}")));
        }
        guarded("decode with", &self.origin, || self.inner.decode(ids, false))
    }

    /// Decodes a text segment.
    pub fn decode_segment(&self, seg: &Segment) -> Result<String> {
        match (&seg.modality, &seg.data) {
            (Modality::Text, motley_shards::SegmentData::Tokens(ids)) => self.decode(ids).map_err(|e| match e {
                TokenizerError::BadSegment { msg, .. } => TokenizerError::bad_segment(seg.meta.source.as_deref(), msg),
                other => other,
            }),
            _ => Err(TokenizerError::bad_segment(
                seg.meta.source.as_deref(),
                format!("not a text token segment ({})", seg.modality),
            )),
        }
    }

    /// The underlying HF tokenizer, for callers that need more (offsets, padding).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn train_save_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.txt");
        let text = "the quick brown fox jumps over the lazy dog\n".repeat(50) + "héllo wörld ünïcode 🦀\n";
        std::fs::write(&f, &text).unwrap();
        let cfg = TextTrainConfig {
            vocab_size: 300,
            special_tokens: vec!["<|endoftext|>".into(), "<|pad|>".into()],
            ..Default::default()
        };
        let (t, s) = TextTokenizer::train(&[f], &cfg).unwrap();
        assert!(s.vocab_size <= 300 && s.vocab_size > 258, "vocab {}", s.vocab_size);
        assert_eq!(t.token_to_id("<|endoftext|>"), Some(0));
        assert_eq!(t.token_to_id("<|pad|>"), Some(1));
        let ids = t.encode("the lazy fox 🦀 ünseen").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "the lazy fox 🦀 ünseen");
        let p = dir.path().join("tok/tokenizer.json");
        t.save(&p).unwrap();
        let t2 = TextTokenizer::from_file(&p).unwrap();
        let batch = t2.encode_batch(&["the quick", "dog dog", ""]).unwrap();
        assert_eq!(batch[0], t.encode("the quick").unwrap());
        assert!(batch[2].is_empty());
        assert!(t.decode(&[t.vocab_size()]).is_err());
    }

    #[test]
    fn bad_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bin.txt");
        std::fs::write(&f, [b'a', 0xff, 0xfe, b'b']).unwrap();
        let e = TextTokenizer::train(&[f], &TextTrainConfig::default()).unwrap_err();
        assert!(e.to_string().contains("bin.txt") && e.to_string().contains("byte offset 1"), "{e}");
        let missing = dir.path().join("missing.json");
        assert!(TextTokenizer::from_file(&missing).unwrap_err().to_string().contains("missing.json"));
        let junk = dir.path().join("junk.json");
        std::fs::write(&junk, "{not json").unwrap();
        assert!(TextTokenizer::from_file(&junk).unwrap_err().to_string().contains("junk.json"));
    }
}
