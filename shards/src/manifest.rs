//! `manifest.json`: the corpus's list of shards with their counts and blake3, the vocabulary,
//! and user-visible maps (`tokenizers`, `extra`). Written last and atomically (tmp + rename).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, ShardError};
use crate::format::{Compression, Footer, Header};
use crate::types::Vocab;
use crate::writer::{PerModality, ShardStats, sync_dir};

/// File name of the manifest inside a corpus directory.
pub const MANIFEST_NAME: &str = "manifest.json";
/// Value of the manifest's `format` field.
pub const MANIFEST_FORMAT: &str = "motley-shards";
/// Manifest schema version.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `"motley-shards"`.
    pub format: String,
    pub version: u32,
    pub vocab: Vocab,
    /// Total documents (sum over shards).
    pub num_docs: u64,
    /// Total shard bytes (sum over shards).
    pub bytes: u64,
    /// Per-modality totals (sum over shards).
    pub totals: PerModality,
    /// Shards in corpus order: global document ids run through them in this order.
    pub shards: Vec<ShardStats>,
    /// Which tokenizer files produced the corpus (ingest fills this; free-form values).
    #[serde(default)]
    pub tokenizers: BTreeMap<String, serde_json::Value>,
    /// Anything else the producer wants to record.
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    /// A manifest over shards whose stats are already known (e.g. from the writers).
    pub fn from_stats(vocab: Vocab, shards: Vec<ShardStats>) -> Manifest {
        let mut totals = PerModality::default();
        for s in &shards {
            totals.add(&s.modalities);
        }
        Manifest {
            format: MANIFEST_FORMAT.to_string(),
            version: MANIFEST_VERSION,
            vocab,
            // Saturating: counts copied from other manifests (merge) must not panic; `check`
            // rejects a manifest whose sums do not fit.
            num_docs: shards.iter().fold(0u64, |a, s| a.saturating_add(s.num_docs)),
            bytes: shards.iter().fold(0u64, |a, s| a.saturating_add(s.bytes)),
            totals,
            shards,
            tokenizers: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Builds the manifest of `dir` from finished shard files, in the given order, reading
    /// each shard's header and footer and hashing the file (no re-tokenizing). Fails if a shard
    /// is missing, unfinished, or was written with a different vocabulary.
    pub fn assemble<S: AsRef<str>>(dir: impl AsRef<Path>, names: &[S], vocab: &Vocab) -> Result<Manifest> {
        let dir = dir.as_ref();
        let mut shards = Vec::with_capacity(names.len());
        for name in names {
            let name = name.as_ref();
            check_name(dir, name)?;
            let path = dir.join(name);
            let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ShardError::MissingShard { path: path.clone() },
                _ => ShardError::io(&path, "open", e),
            })?;
            // SAFETY: shards are immutable once renamed into place; the map is read-only.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ShardError::io(&path, "mmap", e))?;
            let header = Header::decode(&path, &map)?;
            let footer = Footer::decode(&path, &map)?;
            let shard_vocab = read_meta_vocab(&path, &map, &footer)?;
            if &shard_vocab != vocab {
                return Err(ShardError::ManifestMismatch {
                    path,
                    field: "vocab",
                    manifest: serde_json::to_string(vocab).unwrap_or_default(),
                    actual: serde_json::to_string(&shard_vocab).unwrap_or_default(),
                });
            }
            let mut h = blake3::Hasher::new();
            h.update(&map);
            shards.push(ShardStats {
                name: name.to_string(),
                bytes: map.len() as u64,
                blake3: h.finalize().to_hex().to_string(),
                num_docs: footer.num_docs,
                num_chunks: footer.num_chunks,
                compression: header.compression,
                payload_bytes: footer.payload_bytes,
                modalities: PerModality::from_array(footer.stats),
            });
        }
        Ok(Manifest::from_stats(vocab.clone(), shards))
    }

    /// Reads and checks `dir/manifest.json` (self-consistency only; shards are not touched).
    pub fn read(dir: impl AsRef<Path>) -> Result<Manifest> {
        let dir = dir.as_ref();
        let path = dir.join(MANIFEST_NAME);
        let bytes = std::fs::read(&path).map_err(|e| ShardError::io(&path, "read", e))?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| ShardError::Manifest { path: path.clone(), detail: e.to_string() })?;
        m.check(dir)?;
        Ok(m)
    }

    /// Self-consistency: format/version, totals equal the sums over shards, names are plain
    /// and unique.
    pub fn check(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_NAME);
        let bad = |detail: String| ShardError::Manifest { path: path.clone(), detail };
        if self.format != MANIFEST_FORMAT {
            return Err(bad(format!("format is {:?}, expected {MANIFEST_FORMAT:?}", self.format)));
        }
        if self.version != MANIFEST_VERSION {
            return Err(ShardError::Version { path: path.clone(), found: self.version, supported: MANIFEST_VERSION });
        }
        self.vocab.validate().map_err(|e| bad(format!("vocab: {e}")))?;
        let mut seen = std::collections::HashSet::new();
        for s in &self.shards {
            check_name(dir, &s.name)?;
            if !seen.insert(s.name.as_str()) {
                return Err(bad(format!("shard {} listed twice", s.name)));
            }
        }
        let docs = self.shards.iter().try_fold(0u64, |a, s| a.checked_add(s.num_docs));
        if docs != Some(self.num_docs) {
            return Err(bad(format!("num_docs is {} but the shards add up to {docs:?}", self.num_docs)));
        }
        let bytes: u64 = self.shards.iter().fold(0u64, |a, s| a.saturating_add(s.bytes));
        if bytes != self.bytes {
            return Err(bad(format!("bytes is {} but the shards add up to {bytes}", self.bytes)));
        }
        let mut totals = PerModality::default();
        let mut fits = true;
        for s in &self.shards {
            fits &= totals.checked_add(&s.modalities);
        }
        if !fits || totals != self.totals {
            return Err(bad("per-modality totals do not equal the sum over shards".into()));
        }
        Ok(())
    }

    /// Writes `dir/manifest.json` atomically: a temporary file, fsync, rename, fsync the dir.
    pub fn write(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let path = dir.join(MANIFEST_NAME);
        let tmp = dir.join(format!("{MANIFEST_NAME}.tmp"));
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| ShardError::Manifest { path: path.clone(), detail: e.to_string() })?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| ShardError::io(&tmp, "create", e))?;
        f.write_all(&json).and_then(|()| f.write_all(b"\n")).map_err(|e| ShardError::io(&tmp, "write", e))?;
        f.sync_all().map_err(|e| ShardError::io(&tmp, "fsync", e))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| ShardError::io(&path, "rename", e))?;
        sync_dir(&path);
        Ok(())
    }

    /// Compression of the first shard (informational).
    pub fn compression(&self) -> Option<Compression> {
        self.shards.first().map(|s| s.compression)
    }

    /// The tokenizer file recorded for `modality` (`"text"`, `"image"`, …): a path string, or
    /// an object's `file` (pretrained models record one with their factors beside it).
    pub fn tokenizer_file(&self, modality: &str) -> Option<&str> {
        tokenizer_entry_file(self.tokenizers.get(modality)?)
    }

    /// Every tokenizer file recorded with a plain relative path (no `..`, not absolute: the
    /// files that travel with the corpus), as `(modality, path)` in modality order.
    pub fn tokenizer_files(&self) -> Vec<(&str, &str)> {
        self.tokenizers
            .iter()
            .filter_map(|(m, v)| Some((m.as_str(), tokenizer_entry_file(v)?)))
            .filter(|(_, p)| {
                !p.is_empty()
                    && !p.starts_with(['/', '\\'])
                    && !p.contains(':')
                    && !p.split(['/', '\\']).any(|c| c == ".." || c.is_empty())
            })
            .collect()
    }
}

/// The file of one `tokenizers` entry: a path string, or an object's `file` (or `path`).
pub fn tokenizer_entry_file(v: &serde_json::Value) -> Option<&str> {
    match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => o.get("file").or_else(|| o.get("path")).and_then(|v| v.as_str()),
        _ => None,
    }
}

/// Shard names are plain file names inside the corpus directory.
fn check_name(dir: &Path, name: &str) -> Result<()> {
    let plain = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\']);
    if plain {
        Ok(())
    } else {
        Err(ShardError::Manifest {
            path: dir.join(MANIFEST_NAME),
            detail: format!("shard name {name:?} is not a plain file name"),
        })
    }
}

/// Reads the vocabulary from a shard's meta block.
pub(crate) fn read_meta_vocab(path: &Path, file: &[u8], footer: &Footer) -> Result<Vocab> {
    let start = footer.meta_offset as usize;
    let end = footer.meta_offset.saturating_add(footer.meta_len) as usize; // bounds checked by Footer::decode
    let meta =
        file.get(start..end).ok_or_else(|| ShardError::corrupt(path, "meta", footer.meta_offset, "out of range"))?;
    let actual = crc32c::crc32c(meta);
    if actual != footer.meta_crc {
        return Err(crate::format::checksum(path, "meta", footer.meta_offset, footer.meta_crc, actual));
    }
    #[derive(Deserialize)]
    struct Meta {
        vocab: Vocab,
    }
    let m: Meta = serde_json::from_slice(meta)
        .map_err(|e| ShardError::corrupt(path, "meta", footer.meta_offset, e.to_string()))?;
    m.vocab.validate().map_err(|e| ShardError::corrupt(path, "meta", footer.meta_offset, format!("vocab: {e}")))?;
    Ok(m.vocab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_files_take_strings_and_objects_and_only_plain_relative_paths() {
        let mut m = Manifest::from_stats(Vocab::build(10, 4, 4, None), Vec::new());
        let json = |v: &str| serde_json::from_str::<serde_json::Value>(v).expect("json");
        m.tokenizers.insert("text".into(), json(r#""tokenizers/text.json""#));
        m.tokenizers.insert("image".into(), json(r#"{"file": "tokenizers/image.safetensors", "kind": "vq-model"}"#));
        m.tokenizers.insert("speech".into(), json(r#"{"file": "../elsewhere/speech.safetensors"}"#));
        m.tokenizers.insert("other".into(), json("3"));
        assert_eq!(m.tokenizer_file("image"), Some("tokenizers/image.safetensors"));
        assert_eq!(m.tokenizer_file("speech"), Some("../elsewhere/speech.safetensors"));
        assert_eq!(m.tokenizer_file("other"), None);
        assert_eq!(
            m.tokenizer_files(),
            vec![("image", "tokenizers/image.safetensors"), ("text", "tokenizers/text.json")]
        );
        for bad in [r#""/abs/t.json""#, r#""s3://b/t.json""#, r#""a//t.json""#, r#""""#] {
            m.tokenizers.insert("text".into(), json(bad));
            assert_eq!(m.tokenizer_files(), vec![("image", "tokenizers/image.safetensors")], "{bad}");
        }
    }
}
