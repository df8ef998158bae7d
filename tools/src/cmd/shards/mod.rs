//! `motley shards ...`: inspect, verify, decode, merge and export shard corpora. Each
//! subcommand lives in its own file; this one holds the clap enum and the helpers they share
//! (finding and loading the corpus's tokenizers, short previews of ids).

mod decode;
mod export_parquet;
mod head;
mod merge;
mod stats;
mod verify;

use std::path::{Path, PathBuf};

use motley_shards::manifest::tokenizer_entry_file;
use motley_shards::{Manifest, Modality};

use crate::output::Ctx;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Documents, segments and tokens per modality, bytes, and (with --deep) length
    /// histograms and vocabulary usage.
    Stats(stats::Args),
    /// Check every checksum, the indexes and the manifest totals; non-zero exit on any problem.
    Verify(verify::Args),
    /// Print documents in human-readable form (text decoded, images and speech summarized).
    Head(head::Args),
    /// Write one document's parts as files: text, images as PNG, speech as WAV + spectrogram.
    Decode(decode::Args),
    /// Join corpora with the same vocabulary into one (hard links when possible).
    Merge(merge::Args),
    /// Write one Parquet row per segment (doc, segment, modality, tokens, ids).
    ExportParquet(export_parquet::Args),
}

pub fn run(cmd: Command, ctx: &Ctx) -> anyhow::Result<()> {
    match cmd {
        Command::Stats(a) => stats::run(a, ctx),
        Command::Verify(a) => verify::run(a, ctx),
        Command::Head(a) => head::run(a, ctx),
        Command::Decode(a) => decode::run(a, ctx),
        Command::Merge(a) => merge::run(a, ctx),
        Command::ExportParquet(a) => export_parquet::run(a, ctx),
    }
}

/// Where the corpus says the tokenizer of modality `m` lives, if it says so.
///
/// Looked up, in order: `manifest.tokenizers[m]`, `manifest.extra.tokenizers[m]` (each a path
/// string, or an object with a `file` or `path` string), then the vocabulary's
/// `tokenizer` field. Relative paths are relative to the corpus directory.
pub(crate) fn tokenizer_path(dir: &Path, manifest: &Manifest, m: Modality) -> Option<PathBuf> {
    let key = m.as_str();
    let from_map = manifest
        .tokenizer_file(key)
        .or_else(|| manifest.extra.get("tokenizers").and_then(|t| t.get(key)).and_then(tokenizer_entry_file))
        .or_else(|| manifest.vocab.modality(m).and_then(|v| v.tokenizer.as_deref()));
    let rel = from_map?;
    let p = Path::new(rel);
    Some(if p.is_absolute() { p.to_path_buf() } else { dir.join(p) })
}

/// A tokenizer the corpus names, or why it is not available.
pub(crate) enum Found<T> {
    Loaded(T),
    /// Not recorded in the manifest, missing on disk, or failed to load (the reason).
    Missing(String),
}

/// Finds and loads the tokenizer of modality `m` with `load`; never fails: a missing or
/// unreadable tokenizer is reported as `Found::Missing` with the reason.
pub(crate) fn find_tokenizer<T>(
    dir: &Path,
    manifest: &Manifest,
    m: Modality,
    load: impl FnOnce(&Path) -> Result<T, motley_tokenizers::TokenizerError>,
) -> Found<T> {
    let Some(path) = tokenizer_path(dir, manifest, m) else {
        return Found::Missing(format!("the manifest names no {m} tokenizer"));
    };
    if !path.exists() {
        return Found::Missing(format!("{m} tokenizer {} is missing", path.display()));
    }
    match load(&path) {
        Ok(t) => Found::Loaded(t),
        Err(e) => Found::Missing(format!("{m} tokenizer {} could not be loaded: {e}", path.display())),
    }
}

/// Seconds of a speech segment of `len` units at `frame_rate` units per second.
pub(crate) fn seconds(len: usize, frame_rate: Option<f32>) -> Option<f64> {
    frame_rate.filter(|r| *r > 0.0).map(|r| len as f64 / r as f64)
}
