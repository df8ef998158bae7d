//! The TOML ingest recipe: sources, their field names, tokenizer paths and output options.
//!
//! Relative paths in a recipe are relative to the recipe file. `motley ingest` flags build the
//! same structure for the simple cases, so everything downstream sees one `Recipe`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A whole ingest recipe (`motley ingest --config recipe.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Where the tokenizers live. `--tokenizers DIR` overrides these with `DIR/text.json`,
    /// `DIR/image` and `DIR/speech` when those exist.
    #[serde(default)]
    pub tokenizers: TokenizerPaths,
    #[serde(default)]
    pub options: RecipeOptions,
    /// Sources in corpus order: documents of source 0 come first, then source 1, ...
    #[serde(rename = "source", default)]
    pub sources: Vec<SourceSpec>,
}

/// Paths of the tokenizer files (relative to the recipe file when read from TOML).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerPaths {
    /// HF `tokenizer.json` of the text BPE.
    pub text: Option<PathBuf>,
    /// Image tokenizer directory (VQ codebook or latent patch config).
    pub image: Option<PathBuf>,
    /// Speech units directory.
    pub speech: Option<PathBuf>,
}

/// How image segments are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageMode {
    /// Discrete VQ codes (Chameleon style).
    #[default]
    Vq,
    /// Continuous latent patches (Transfusion style).
    Latent,
}

/// Options that shape the output corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeOptions {
    /// Image segments as VQ codes or latent patches; unset = whatever the image tokenizer is
    /// (a directory holding both prefers VQ).
    #[serde(default)]
    pub image_mode: Option<ImageMode>,
    /// Seed for the per-record order choices (caption first or image first, ...). The choice
    /// is a hash of (seed, file, record), so it does not depend on scheduling.
    #[serde(default)]
    pub seed: u64,
    /// Drop exact duplicates (same content hash), keeping the first in corpus order.
    #[serde(default)]
    pub dedup: bool,
    /// Target size of one task's input, in MiB: Parquet files are split into tasks of row
    /// groups of about this size; smaller files are one task each.
    #[serde(default = "default_task_mib")]
    pub task_mib: f64,
    /// At most this many files are grouped into one task.
    #[serde(default = "default_task_files")]
    pub task_files: usize,
    /// Plain text files are cut into documents of about this many bytes: at the first blank
    /// line past it, or at any line boundary past twice it, and a line longer than twice it
    /// inside, after a space past it or between characters (bounded memory per record).
    #[serde(default = "default_max_text_bytes")]
    pub max_text_bytes: u64,
    /// Shards roll over before growing past this many MiB.
    #[serde(default = "default_shard_mib")]
    pub shard_mib: u64,
    /// Chunk compression of the shards ("raw" or "zstd"); unset: raw (the CLI picks zstd for
    /// an object-store `--out`). Left out of the recipe when unset, so older ingests resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<motley_shards::Compression>,
    /// Load every tokenizer the recipe names (or `--tokenizers DIR` holds), not only those its
    /// sources need, so the vocabulary has every modality's block. Corpora ingested from
    /// different sources this way share one vocabulary, which the loader needs to mix them
    /// by weight (`data.weights`); the study mixes in `data/sample/study/` are built so.
    /// (Left out of the serialized options when false, so older recipes fingerprint as before.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_tokenizers: bool,
}

/// Largest `options.shard_mib` (16 TiB shards; far past any file system's sweet spot).
pub const MAX_SHARD_MIB: u64 = 1 << 24;

fn default_shard_mib() -> u64 {
    256
}

fn default_task_mib() -> f64 {
    64.0
}

fn default_task_files() -> usize {
    4096
}

fn default_max_text_bytes() -> u64 {
    16 << 20
}

impl Default for RecipeOptions {
    fn default() -> Self {
        RecipeOptions {
            image_mode: None,
            seed: 0,
            dedup: false,
            task_mib: default_task_mib(),
            task_files: default_task_files(),
            max_text_bytes: default_max_text_bytes(),
            shard_mib: default_shard_mib(),
            compression: None,
            all_tokenizers: false,
        }
    }
}

/// What kind of documents a source yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Text-only documents: plain files, JSONL (`text_field`), Parquet (`text_field`).
    Text,
    /// Image documents, optionally with captions (caption→image or image→caption).
    Image,
    /// Speech documents, optionally with transcripts (speech-only or text+speech).
    Speech,
    /// JSONL rows holding an ordered list of text / image / audio parts.
    Interleaved,
}

/// Whether speech sources keep their transcripts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpeechMode {
    /// Transcript and speech in one document (order by `text_first`); speech alone when a
    /// record has no transcript.
    #[default]
    Interleaved,
    /// Speech units only; transcripts are ignored.
    SpeechOnly,
}

/// One input source. Fields not used by the source's kind are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Name used in progress and errors; defaults to `<kind><index>`.
    #[serde(default)]
    pub name: Option<String>,
    pub kind: SourceKind,
    /// Files, directories or glob patterns, local or in an object store (`s3://…`).
    /// `.jsonl`/`.json` are JSONL, `.parquet` Parquet, `.tar` (`.tar.gz`, `.tgz`) WebDataset
    /// shards; text sources read other files as plain text, image and speech sources read
    /// image and audio files (sidecar `.txt` with the same stem = caption / transcript);
    /// directories are walked recursively.
    pub paths: Vec<String>,
    /// JSONL key / Parquet column of the text, caption or transcript; in a WebDataset tar, the
    /// extension of its member (default `txt`).
    #[serde(default, alias = "text_key", alias = "text_column", alias = "caption_field", alias = "transcript_field")]
    pub text_field: Option<String>,
    /// JSONL key / Parquet column of the image (bytes, path relative to the file, or a
    /// `{bytes, path}` struct as in Hugging Face datasets dumps); in a WebDataset tar, the
    /// extension of its member (default: the first with an image format's extension).
    #[serde(default, alias = "image_key", alias = "image_column")]
    pub image_field: Option<String>,
    /// JSONL key / Parquet column of the audio; in a WebDataset tar, its member's extension
    /// (like `image_field`).
    #[serde(default, alias = "audio_key", alias = "audio_column")]
    pub audio_field: Option<String>,
    /// JSONL key of the interleaved part list (default `parts`).
    #[serde(default)]
    pub parts_field: Option<String>,
    /// Probability that the caption / transcript comes before the image / speech
    /// (default 0.8 for images as in Transfusion, 0.5 for speech).
    #[serde(default)]
    pub text_first: Option<f64>,
    #[serde(default)]
    pub speech_mode: Option<SpeechMode>,
}

impl SourceSpec {
    pub fn new(kind: SourceKind, paths: Vec<String>) -> Self {
        SourceSpec {
            name: None,
            kind,
            paths,
            text_field: None,
            image_field: None,
            audio_field: None,
            parts_field: None,
            text_first: None,
            speech_mode: None,
        }
    }

    pub fn text_field(&self) -> &str {
        match (&self.text_field, self.kind) {
            (Some(f), _) => f,
            (None, SourceKind::Image) => "caption",
            (None, SourceKind::Speech) => "transcript",
            (None, _) => "text",
        }
    }

    pub fn image_field(&self) -> &str {
        self.image_field.as_deref().unwrap_or("image")
    }

    pub fn audio_field(&self) -> &str {
        self.audio_field.as_deref().unwrap_or("audio")
    }

    pub fn parts_field(&self) -> &str {
        self.parts_field.as_deref().unwrap_or("parts")
    }

    pub fn text_first(&self) -> f64 {
        self.text_first.unwrap_or(match self.kind {
            SourceKind::Image => 0.8,
            _ => 0.5,
        })
    }

    pub fn speech_mode(&self) -> SpeechMode {
        self.speech_mode.unwrap_or_default()
    }

    fn validate(&self, index: usize) -> std::result::Result<(), String> {
        let who = format!("source #{index} ({})", self.display_name(index));
        if self.paths.is_empty() {
            return Err(format!("{who}: `paths` is empty"));
        }
        let unused = |set: bool, field: &str| -> std::result::Result<(), String> {
            if set { Err(format!("{who}: `{field}` does not apply to kind {:?}", self.kind)) } else { Ok(()) }
        };
        match self.kind {
            SourceKind::Text => {
                unused(self.image_field.is_some(), "image_field")?;
                unused(self.audio_field.is_some(), "audio_field")?;
                unused(self.parts_field.is_some(), "parts_field")?;
                unused(self.text_first.is_some(), "text_first")?;
                unused(self.speech_mode.is_some(), "speech_mode")?;
            }
            SourceKind::Image => {
                unused(self.audio_field.is_some(), "audio_field")?;
                unused(self.parts_field.is_some(), "parts_field")?;
                unused(self.speech_mode.is_some(), "speech_mode")?;
            }
            SourceKind::Speech => {
                unused(self.image_field.is_some(), "image_field")?;
                unused(self.parts_field.is_some(), "parts_field")?;
            }
            SourceKind::Interleaved => {
                unused(self.image_field.is_some(), "image_field")?;
                unused(self.audio_field.is_some(), "audio_field")?;
                unused(self.text_field.is_some(), "text_field")?;
                unused(self.text_first.is_some(), "text_first")?;
                unused(self.speech_mode.is_some(), "speech_mode")?;
            }
        }
        if let Some(p) = self.text_first
            && !(0.0..=1.0).contains(&p)
        {
            return Err(format!("{who}: text_first = {p} is not a probability in [0, 1]"));
        }
        Ok(())
    }

    /// The name shown in progress and errors.
    pub fn display_name(&self, index: usize) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => {
                let kind = match self.kind {
                    SourceKind::Text => "text",
                    SourceKind::Image => "image",
                    SourceKind::Speech => "speech",
                    SourceKind::Interleaved => "interleaved",
                };
                format!("{kind}{index}")
            }
        }
    }
}

/// Standard file names inside a `--tokenizers DIR` (as written by `motley tokenizer ...`).
pub const TEXT_TOKENIZER_FILE: &str = "text.json";
pub const IMAGE_TOKENIZER_DIR: &str = "image";
pub const SPEECH_TOKENIZER_DIR: &str = "speech";

impl Recipe {
    /// Parses a recipe file and makes its relative paths absolute against the file's folder.
    pub fn from_file(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read recipe", path, e))?;
        let mut recipe =
            Recipe::from_toml(&text).map_err(|message| Error::Recipe { path: path.to_path_buf(), message })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        recipe.rebase(&base);
        Ok(recipe)
    }

    /// Parses and validates recipe text (paths stay as written).
    pub fn from_toml(text: &str) -> std::result::Result<Recipe, String> {
        let recipe: Recipe = toml::from_str(text).map_err(|e| e.to_string())?;
        recipe.validate()?;
        Ok(recipe)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.sources.is_empty() {
            return Err("no [[source]] given".into());
        }
        for (i, s) in self.sources.iter().enumerate() {
            s.validate(i)?;
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            if !names.insert(s.display_name(i)) {
                return Err(format!("two sources are named {:?}", s.display_name(i)));
            }
        }
        if !(self.options.task_mib > 0.0 && self.options.task_mib.is_finite()) {
            return Err("options.task_mib must be > 0".into());
        }
        if self.options.task_files == 0 {
            return Err("options.task_files must be > 0".into());
        }
        // Shards are sized in bytes (`shard_mib << 20`): past 2^44 MiB that no longer fits a u64.
        if self.options.shard_mib == 0 || self.options.shard_mib > MAX_SHARD_MIB {
            return Err(format!("options.shard_mib must be in 1..={MAX_SHARD_MIB}"));
        }
        if self.options.max_text_bytes == 0 {
            return Err("options.max_text_bytes must be > 0".into());
        }
        Ok(())
    }

    /// Joins relative source and tokenizer paths onto `base`.
    pub fn rebase(&mut self, base: &Path) {
        let join = |p: &PathBuf| if p.is_absolute() { p.clone() } else { base.join(p) };
        for p in
            [&mut self.tokenizers.text, &mut self.tokenizers.image, &mut self.tokenizers.speech].into_iter().flatten()
        {
            *p = join(p);
        }
        for s in &mut self.sources {
            for p in &mut s.paths {
                if !Path::new(p.as_str()).is_absolute() && !crate::remote_input::is_remote(p) {
                    *p = base.join(p.as_str()).to_string_lossy().into_owned();
                }
            }
        }
    }

    /// Applies `--tokenizers DIR`: each standard entry present in `dir` replaces the recipe's
    /// path. `DIR` is laid out as `motley tokenizer` writes it (`text.json`, `image/`,
    /// `speech/`) or as a corpus keeps its own (`CORPUS/tokenizers/`: `text.json`,
    /// `image.safetensors`, `speech.safetensors`); the folder wins when both are there.
    pub fn locate_tokenizers(&mut self, dir: &Path) {
        let text = dir.join(TEXT_TOKENIZER_FILE);
        if text.is_file() {
            self.tokenizers.text = Some(text);
        }
        let find = |name: &str| {
            let folder = dir.join(name);
            let file = dir.join(format!("{name}.safetensors"));
            if folder.exists() { Some(folder) } else { file.is_file().then_some(file) }
        };
        if let Some(image) = find(IMAGE_TOKENIZER_DIR) {
            self.tokenizers.image = Some(image);
        }
        if let Some(speech) = find(SPEECH_TOKENIZER_DIR) {
            self.tokenizers.speech = Some(speech);
        }
    }

    /// Which modalities the sources can produce (so only the needed tokenizers are loaded).
    pub fn needs(&self) -> Needs {
        let mut n = Needs::default();
        for s in &self.sources {
            match s.kind {
                SourceKind::Text => n.text = true,
                SourceKind::Image => {
                    n.text = true;
                    n.image = true;
                }
                SourceKind::Speech => {
                    n.speech = true;
                    n.text |= s.speech_mode() == SpeechMode::Interleaved;
                }
                SourceKind::Interleaved => {
                    n.text = true;
                    n.image = true;
                    n.speech = true;
                }
            }
        }
        n
    }

    /// The tokenizers to load: those the sources need, plus every one the recipe names when
    /// `options.all_tokenizers` is set (the vocabulary then has every modality's block).
    pub fn tokenizers_to_load(&self) -> Needs {
        let mut n = self.needs();
        if self.options.all_tokenizers {
            n.text |= self.tokenizers.text.is_some();
            n.image |= self.tokenizers.image.is_some();
            n.speech |= self.tokenizers.speech.is_some();
        }
        n
    }
}

/// Which tokenizers a recipe needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub text: bool,
    pub image: bool,
    pub speech: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_recipe() {
        let r = Recipe::from_toml(
            r#"
            [tokenizers]
            text = "tok/text.json"
            [options]
            image_mode = "latent"
            seed = 7
            [[source]]
            kind = "text"
            paths = ["text/*.txt"]
            [[source]]
            name = "caps"
            kind = "image"
            paths = ["images.jsonl"]
            caption_field = "caption"
            text_first = 0.8
            [[source]]
            kind = "speech"
            paths = ["speech.jsonl"]
            speech_mode = "speech_only"
            "#,
        )
        .expect("valid recipe");
        assert_eq!(r.sources.len(), 3);
        assert_eq!(r.options.image_mode, Some(ImageMode::Latent));
        assert_eq!(r.sources[1].text_field(), "caption");
        assert_eq!(r.sources[2].speech_mode(), SpeechMode::SpeechOnly);
        assert_eq!(r.sources[0].display_name(0), "text0");
        assert!(!r.needs().text || r.needs().image);
    }

    #[test]
    fn rejects_unknown_and_misplaced_fields() {
        let unknown = Recipe::from_toml("[[source]]\nkind = \"text\"\npaths = [\"a\"]\ncolour = 1\n");
        assert!(unknown.is_err_and(|e| e.contains("colour")));
        let misplaced = Recipe::from_toml("[[source]]\nkind = \"text\"\npaths = [\"a\"]\nimage_field = \"x\"\n");
        assert!(misplaced.is_err_and(|e| e.contains("image_field")));
        let bad_p = Recipe::from_toml("[[source]]\nkind = \"image\"\npaths = [\"a\"]\ntext_first = 1.5\n");
        assert!(bad_p.is_err_and(|e| e.contains("text_first")));
        assert!(Recipe::from_toml("").is_err());
        for (key, value) in
            [("shard_mib", "0"), ("shard_mib", "17592186044416"), ("task_mib", "nan"), ("task_files", "0")]
        {
            let r = Recipe::from_toml(&format!(
                "[options]\n{key} = {value}\n[[source]]\nkind = \"text\"\npaths = [\"a\"]\n"
            ));
            assert!(r.as_ref().is_err_and(|e| e.contains(key)), "{key} = {value}: {r:?}");
        }
    }

    #[test]
    fn all_tokenizers_loads_every_named_tokenizer() {
        let text_only =
            "[tokenizers]\ntext = \"t.json\"\nspeech = \"sp\"\n[[source]]\nkind = \"text\"\npaths = [\"a\"]\n";
        let r = Recipe::from_toml(text_only).expect("valid");
        assert_eq!(r.tokenizers_to_load(), Needs { text: true, image: false, speech: false });
        // Off by default, and then not serialized (fingerprints of older recipes stay as they were).
        assert!(!serde_json::to_string(&r.options).expect("json").contains("all_tokenizers"));
        let all = Recipe::from_toml(&text_only.replace("[[source]]", "[options]\nall_tokenizers = true\n[[source]]"))
            .expect("valid");
        assert_eq!(all.tokenizers_to_load(), Needs { text: true, image: false, speech: true });
    }

    #[test]
    fn rebases_relative_paths() {
        let mut r = Recipe::from_toml(
            "[tokenizers]\ntext = \"t.json\"\n[[source]]\nkind = \"text\"\npaths = [\"a/*.txt\", \"/abs\", \"s3://b/x/*.tar\"]\n",
        )
        .expect("valid");
        r.rebase(Path::new("/data/x"));
        assert_eq!(r.tokenizers.text.as_deref(), Some(Path::new("/data/x/t.json")));
        assert_eq!(
            r.sources[0].paths,
            vec!["/data/x/a/*.txt".to_string(), "/abs".to_string(), "s3://b/x/*.tar".into()]
        );
    }
}
