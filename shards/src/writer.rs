//! Crash-safe writers: `ShardWriter` writes one `.mshard` under a temporary name and renames
//! it into place when complete; `CorpusWriter` rolls a directory of shards at a size bound.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, ShardError};
use crate::format::{
    self, ALIGN, ChunkEntry, Compression, FLAG_FRAME_RATE, FLAG_GRID, FLAG_SOURCE, Footer, Header, INDEX_ENTRY_LEN,
    IndexEntry, KIND_LATENT_F16, KIND_TOKENS, ModalityStats, RECORD_HEADER_LEN, SEGMENT_DESC_LEN, SegmentDesc,
    align_up,
};
use crate::manifest::Manifest;
use crate::types::{Document, Modality, SegmentData, Vocab};

/// File extension of shards.
pub const SHARD_EXT: &str = "mshard";
/// Suffix appended to a shard's name while it is being written.
pub const TMP_SUFFIX: &str = ".tmp";

/// How shards are written. Build with [`WriterProperties::builder`].
#[derive(Debug, Clone, PartialEq)]
pub struct WriterProperties {
    pub compression: Compression,
    /// Target uncompressed bytes per chunk (a larger document gets a chunk of its own).
    pub chunk_size: usize,
    /// zstd level when `compression` is zstd.
    pub zstd_level: i32,
    /// `CorpusWriter` starts a new shard before one would grow past this many bytes.
    pub max_shard_bytes: u64,
}

impl Default for WriterProperties {
    fn default() -> Self {
        // Raw by default: zero-copy reads, and the loader benchmark shows zstd decoding costs
        // more than it saves on token ids (see docs/FORMAT.md, "Compression").
        WriterProperties {
            compression: Compression::Raw,
            chunk_size: 1 << 20,
            zstd_level: 3,
            max_shard_bytes: 256 << 20,
        }
    }
}

impl WriterProperties {
    pub fn builder() -> WriterPropertiesBuilder {
        WriterPropertiesBuilder { props: WriterProperties::default() }
    }
}

/// Builder for [`WriterProperties`] (arrow-rs style).
#[derive(Debug, Clone)]
pub struct WriterPropertiesBuilder {
    props: WriterProperties,
}

impl WriterPropertiesBuilder {
    pub fn compression(mut self, c: Compression) -> Self {
        self.props.compression = c;
        self
    }
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.props.chunk_size = bytes.max(1);
        self
    }
    pub fn zstd_level(mut self, level: i32) -> Self {
        self.props.zstd_level = level;
        self
    }
    pub fn max_shard_bytes(mut self, bytes: u64) -> Self {
        self.props.max_shard_bytes = bytes;
        self
    }
    pub fn build(self) -> WriterProperties {
        self.props
    }
}

/// Per-modality statistics, as stored in the manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerModality {
    pub text: ModalityStats,
    pub image: ModalityStats,
    pub speech: ModalityStats,
}

impl PerModality {
    pub fn get(&self, m: Modality) -> &ModalityStats {
        match m {
            Modality::Text => &self.text,
            Modality::Image => &self.image,
            Modality::Speech => &self.speech,
        }
    }
    pub fn from_array(a: [ModalityStats; 3]) -> Self {
        PerModality { text: a[0], image: a[1], speech: a[2] }
    }
    pub fn to_array(&self) -> [ModalityStats; 3] {
        [self.text, self.image, self.speech]
    }
    pub(crate) fn add(&mut self, o: &PerModality) {
        let _ = self.checked_add(o);
    }

    /// Adds `o` in place; false when a count overflowed (it then saturates), which only a
    /// hostile manifest can make happen.
    pub(crate) fn checked_add(&mut self, o: &PerModality) -> bool {
        let mut ok = true;
        for (s, x) in [(&mut self.text, &o.text), (&mut self.image, &o.image), (&mut self.speech, &o.speech)] {
            for (a, b) in [(&mut s.docs, x.docs), (&mut s.segments, x.segments), (&mut s.tokens, x.tokens)] {
                ok &= a.checked_add(b).is_some();
                *a = a.saturating_add(b);
            }
        }
        ok
    }
}

/// What a finished shard holds; also its entry in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardStats {
    /// File name inside the corpus directory.
    pub name: String,
    /// File size in bytes.
    pub bytes: u64,
    /// blake3 of the whole file, lowercase hex.
    pub blake3: String,
    pub num_docs: u64,
    pub num_chunks: u64,
    pub compression: Compression,
    /// Uncompressed bytes of all chunks.
    pub payload_bytes: u64,
    pub modalities: PerModality,
}

/// Writes one shard. The file appears under its final name only after [`ShardWriter::finish`].
#[derive(Debug)]
pub struct ShardWriter {
    final_path: PathBuf,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    hasher: blake3::Hasher,
    pos: u64,
    props: WriterProperties,
    vocab: Vocab,
    chunk: Vec<u8>,
    chunks: Vec<ChunkEntry>,
    index: Vec<u8>,
    num_docs: u64,
    first_doc_of_chunk: u64,
    stats: [ModalityStats; 3],
    payload_bytes: u64,
    record: Vec<u8>,
}

impl ShardWriter {
    /// Starts writing `path` (written as `path.tmp` until finished).
    pub fn create(path: impl AsRef<Path>, vocab: &Vocab, props: WriterProperties) -> Result<ShardWriter> {
        let final_path = path.as_ref().to_path_buf();
        let mut tmp = final_path.clone().into_os_string();
        tmp.push(TMP_SUFFIX);
        let tmp_path = PathBuf::from(tmp);
        if props.chunk_size > u32::MAX as usize {
            return Err(ShardError::Config(format!("chunk_size {} exceeds 4 GiB", props.chunk_size)));
        }
        let file = File::create(&tmp_path).map_err(|e| ShardError::io(&tmp_path, "create", e))?;
        let mut w = ShardWriter {
            final_path,
            tmp_path,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            hasher: blake3::Hasher::new(),
            pos: 0,
            vocab: vocab.clone(),
            chunk: Vec::with_capacity(props.chunk_size.min(64 << 20) + 4096),
            chunks: Vec::new(),
            index: Vec::new(),
            num_docs: 0,
            first_doc_of_chunk: 0,
            stats: [ModalityStats::default(); 3],
            payload_bytes: 0,
            record: Vec::new(),
            props,
        };
        let header = Header {
            version: format::VERSION,
            compression: w.props.compression,
            chunk_size: w.props.chunk_size as u32,
        };
        w.write(&header.encode())?;
        Ok(w)
    }

    /// Documents added so far.
    pub fn num_docs(&self) -> u64 {
        self.num_docs
    }

    /// Bytes the file would have if finished now (an upper bound when compressing).
    pub fn estimated_size(&self) -> u64 {
        self.pos
            + self.chunk.len() as u64
            + ALIGN as u64
            + (self.chunks.len() as u64 + 1) * format::CHUNK_ENTRY_LEN as u64
            + self.index.len() as u64
            + 1024
            + format::FOOTER_LEN as u64
    }

    /// Appends one document; returns its index inside this shard.
    pub fn add_document(&mut self, doc: &Document) -> Result<u64> {
        let mut rec = std::mem::take(&mut self.record);
        let r = encode_record(doc, &self.vocab, self.num_docs, &mut rec).and_then(|()| self.add_encoded(doc, &rec));
        self.record = rec;
        r
    }

    fn add_encoded(&mut self, doc: &Document, rec: &[u8]) -> Result<u64> {
        if !self.chunk.is_empty() && self.chunk.len() + rec.len() > self.props.chunk_size {
            self.flush_chunk()?;
        }
        let offset = self.chunk.len();
        if offset + rec.len() > u32::MAX as usize {
            return Err(ShardError::InvalidDocument {
                doc: self.num_docs,
                segment: 0,
                detail: format!("record of {} bytes does not fit a chunk (4 GiB limit)", rec.len()),
            });
        }
        self.chunk.extend_from_slice(rec);
        self.chunk.resize(align_up(self.chunk.len()), 0);
        let positions: u64 = doc.segments.iter().map(|s| s.data.len() as u64).sum();
        let entry = IndexEntry {
            chunk: self.chunks.len() as u32,
            offset: offset as u32,
            len: rec.len() as u32,
            positions: positions.min(u32::MAX as u64) as u32,
        };
        self.index.extend_from_slice(&entry.encode());
        let mut seen = [false; 3];
        for s in &doc.segments {
            let st = &mut self.stats[s.modality.index()];
            st.segments += 1;
            st.tokens += s.data.len() as u64;
            seen[s.modality.index()] = true;
        }
        for (m, s) in seen.iter().enumerate() {
            if *s {
                self.stats[m].docs += 1;
            }
        }
        self.num_docs += 1;
        Ok(self.num_docs - 1)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().ok_or_else(|| ShardError::Config("writer already finished".into()))?;
        out.write_all(bytes).map_err(|e| ShardError::io(&self.tmp_path, "write", e))?;
        self.hasher.update(bytes);
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = align_up(self.pos as usize) - self.pos as usize;
        if n > 0 {
            self.write(&[0u8; ALIGN][..n])?;
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        self.pad()?;
        let raw = std::mem::take(&mut self.chunk);
        let stored = match self.props.compression {
            Compression::Raw => None,
            Compression::Zstd => Some(
                zstd::bulk::compress(&raw, self.props.zstd_level)
                    .map_err(|e| ShardError::io(&self.tmp_path, "zstd compress", e))?,
            ),
        };
        let bytes: &[u8] = stored.as_deref().unwrap_or(&raw);
        let entry = ChunkEntry {
            file_offset: self.pos,
            stored_len: u32::try_from(bytes.len())
                .map_err(|_| ShardError::Config("compressed chunk exceeds 4 GiB".into()))?,
            raw_len: raw.len() as u32,
            crc: crc32c::crc32c(bytes),
            first_doc: self.first_doc_of_chunk,
        };
        self.write(bytes)?;
        self.payload_bytes += raw.len() as u64;
        self.chunks.push(entry);
        self.first_doc_of_chunk = self.num_docs;
        self.chunk = raw;
        self.chunk.clear();
        Ok(())
    }

    /// Writes the index and footer, fsyncs and renames the shard into place.
    pub fn finish(mut self) -> Result<ShardStats> {
        self.flush_chunk()?;
        self.pad()?;
        let chunk_table_offset = self.pos;
        let mut table = Vec::with_capacity(self.chunks.len() * format::CHUNK_ENTRY_LEN);
        for c in &self.chunks {
            table.extend_from_slice(&c.encode());
        }
        let mut crc = crc32c::crc32c(&table);
        crc = crc32c::crc32c_append(crc, &self.index);
        self.write(&table)?;
        let doc_index_offset = self.pos;
        let index = std::mem::take(&mut self.index);
        self.write(&index)?;
        let meta = serde_json::json!({
            "vocab": self.vocab,
            "writer": concat!("motley-shards ", env!("CARGO_PKG_VERSION")),
        });
        let meta = serde_json::to_vec(&meta).map_err(|e| ShardError::Config(format!("meta json: {e}")))?;
        let meta_offset = self.pos;
        self.write(&meta)?;
        let footer = Footer {
            compression_code: self.props.compression.code(),
            num_docs: self.num_docs,
            num_chunks: self.chunks.len() as u64,
            chunk_table_offset,
            doc_index_offset,
            meta_offset,
            meta_len: meta.len() as u64,
            stats: self.stats,
            payload_bytes: self.payload_bytes,
            index_crc: crc,
            meta_crc: crc32c::crc32c(&meta),
        };
        self.write(&footer.encode())?;
        let out = self.out.take().ok_or_else(|| ShardError::Config("writer already finished".into()))?;
        let file = out.into_inner().map_err(|e| ShardError::io(&self.tmp_path, "flush", e.into_error()))?;
        file.sync_all().map_err(|e| ShardError::io(&self.tmp_path, "fsync", e))?;
        drop(file);
        std::fs::rename(&self.tmp_path, &self.final_path).map_err(|e| ShardError::io(&self.final_path, "rename", e))?;
        sync_dir(&self.final_path);
        let name = self.final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(ShardStats {
            name,
            bytes: self.pos,
            blake3: self.hasher.finalize().to_hex().to_string(),
            num_docs: self.num_docs,
            num_chunks: self.chunks.len() as u64,
            compression: self.props.compression,
            payload_bytes: self.payload_bytes,
            modalities: PerModality::from_array(self.stats),
        })
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // Unfinished: remove the partial temporary file (best effort; readers never see it anyway).
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// fsyncs the directory holding `path` so the rename is durable (best effort, not on all OSes).
pub(crate) fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Encodes one document record (see docs/FORMAT.md) into `out`, validating ids and shapes.
pub(crate) fn encode_record(doc: &Document, vocab: &Vocab, doc_no: u64, out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    let n = doc.segments.len();
    let invalid = |segment: usize, detail: String| ShardError::InvalidDocument { doc: doc_no, segment, detail };
    if n > u32::MAX as usize {
        return Err(invalid(0, "too many segments".into()));
    }
    let table_end = RECORD_HEADER_LEN + n * SEGMENT_DESC_LEN;
    out.resize(table_end, 0);
    out[0..4].copy_from_slice(&(n as u32).to_le_bytes());
    let mut descs = Vec::with_capacity(n);
    // Source strings right after the descriptor table, then the aligned payloads.
    for (i, s) in doc.segments.iter().enumerate() {
        let mv = vocab
            .modality(s.modality)
            .ok_or_else(|| invalid(i, format!("modality {} not in the vocabulary", s.modality)))?;
        let (kind, width, len, dim) = match &s.data {
            SegmentData::Tokens(ids) => {
                if let Some((j, &bad)) = ids.iter().enumerate().find(|(_, id)| **id >= mv.vocab_size) {
                    return Err(invalid(
                        i,
                        format!("{} id {bad} at position {j} is outside vocab size {}", s.modality, mv.vocab_size),
                    ));
                }
                (KIND_TOKENS, format::id_width(mv.vocab_size), ids.len(), 0u32)
            }
            SegmentData::Latent { dim, data } => {
                if mv.latent_dim != Some(*dim) || *dim == 0 {
                    return Err(invalid(
                        i,
                        format!("latent dim {dim} but the vocabulary says {:?} for {}", mv.latent_dim, s.modality),
                    ));
                }
                if data.len() % *dim as usize != 0 {
                    return Err(invalid(i, format!("{} latent values are not a multiple of dim {dim}", data.len())));
                }
                (KIND_LATENT_F16, 2u8, data.len() / *dim as usize, *dim)
            }
        };
        let len = u32::try_from(len).map_err(|_| invalid(i, "segment longer than 2^32 positions".into()))?;
        let mut flags = 0u8;
        let mut grid = (0, 0);
        let mut frame_rate = 0.0f32;
        if let Some(g) = s.meta.grid {
            flags |= FLAG_GRID;
            grid = g;
        }
        if let Some(f) = s.meta.frame_rate {
            flags |= FLAG_FRAME_RATE;
            frame_rate = f;
        }
        let (mut source_offset, mut source_len) = (0u32, 0u32);
        if let Some(src) = &s.meta.source {
            flags |= FLAG_SOURCE;
            source_offset = out.len() as u32;
            source_len = u32::try_from(src.len()).map_err(|_| invalid(i, "source string too long".into()))?;
            out.extend_from_slice(src.as_bytes());
        }
        descs.push(SegmentDesc {
            modality: s.modality,
            kind,
            width,
            flags,
            len,
            dim,
            grid,
            frame_rate,
            payload_offset: 0,
            payload_bytes: 0,
            source_offset,
            source_len,
        });
    }
    for (i, s) in doc.segments.iter().enumerate() {
        out.resize(align_up(out.len()), 0);
        let start = out.len();
        match &s.data {
            SegmentData::Tokens(ids) => match descs[i].width {
                1 => out.extend(ids.iter().map(|&v| v as u8)),
                2 => {
                    for &v in ids {
                        out.extend_from_slice(&(v as u16).to_le_bytes());
                    }
                }
                _ => {
                    for &v in ids {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            },
            SegmentData::Latent { data, .. } => {
                for v in data {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        let bytes = out.len() - start;
        descs[i].payload_offset = u32::try_from(start).map_err(|_| invalid(i, "record exceeds 4 GiB".into()))?;
        descs[i].payload_bytes = u32::try_from(bytes).map_err(|_| invalid(i, "segment exceeds 4 GiB".into()))?;
    }
    if out.len() > u32::MAX as usize {
        return Err(invalid(0, "record exceeds 4 GiB".into()));
    }
    for (i, d) in descs.iter().enumerate() {
        let at = RECORD_HEADER_LEN + i * SEGMENT_DESC_LEN;
        out[at..at + SEGMENT_DESC_LEN].copy_from_slice(&d.encode());
    }
    Ok(())
}

/// Writes a directory of shards named `{prefix}-{NNN}.mshard`, rolling to a new shard before
/// one would exceed `max_shard_bytes`.
#[derive(Debug)]
pub struct CorpusWriter {
    dir: PathBuf,
    prefix: String,
    vocab: Vocab,
    props: WriterProperties,
    current: Option<ShardWriter>,
    next_shard: u32,
    finished: Vec<ShardStats>,
    record: Vec<u8>,
    docs: u64,
}

impl CorpusWriter {
    /// Creates `dir` if needed. `prefix` names the shards (e.g. `task-00017` gives
    /// `task-00017-000.mshard`, `task-00017-001.mshard`, ...).
    pub fn create(dir: impl AsRef<Path>, vocab: &Vocab, props: WriterProperties, prefix: &str) -> Result<CorpusWriter> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| ShardError::io(&dir, "create dir", e))?;
        if prefix.is_empty() || prefix.contains(['/', '\\']) {
            return Err(ShardError::Config(format!("shard prefix {prefix:?} must be a non-empty file name")));
        }
        // Leftovers of a crashed earlier run with this prefix are never part of a corpus.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{prefix}-")) && name.ends_with(&format!(".{SHARD_EXT}{TMP_SUFFIX}")) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(CorpusWriter {
            dir,
            prefix: prefix.to_string(),
            vocab: vocab.clone(),
            props,
            current: None,
            next_shard: 0,
            finished: Vec::new(),
            record: Vec::new(),
            docs: 0,
        })
    }

    /// The file name shard number `i` of this writer gets.
    pub fn shard_name(prefix: &str, i: u32) -> String {
        format!("{prefix}-{i:03}.{SHARD_EXT}")
    }

    pub fn add_document(&mut self, doc: &Document) -> Result<()> {
        let mut rec = std::mem::take(&mut self.record);
        let r = self.add_inner(doc, &mut rec);
        self.record = rec;
        r
    }

    fn add_inner(&mut self, doc: &Document, rec: &mut Vec<u8>) -> Result<()> {
        encode_record(doc, &self.vocab, self.docs, rec)?;
        let grow = rec.len() as u64 + INDEX_ENTRY_LEN as u64 + ALIGN as u64;
        if let Some(cur) = &self.current
            && cur.num_docs() > 0
            && cur.estimated_size() + grow > self.props.max_shard_bytes
        {
            self.roll()?;
        }
        if self.current.is_none() {
            let path = self.dir.join(Self::shard_name(&self.prefix, self.next_shard));
            self.next_shard += 1;
            self.current = Some(ShardWriter::create(path, &self.vocab, self.props.clone())?);
        }
        if let Some(cur) = self.current.as_mut() {
            cur.add_encoded(doc, rec)?;
        }
        self.docs += 1;
        Ok(())
    }

    fn roll(&mut self) -> Result<()> {
        if let Some(cur) = self.current.take() {
            self.finished.push(cur.finish()?);
        }
        Ok(())
    }

    /// Finishes the last shard; returns the stats of every shard this writer produced, in order.
    pub fn finish(mut self) -> Result<Vec<ShardStats>> {
        self.roll()?;
        Ok(std::mem::take(&mut self.finished))
    }

    /// Finishes and writes `manifest.json` listing exactly this writer's shards.
    pub fn finish_with_manifest(self) -> Result<Manifest> {
        let dir = self.dir.clone();
        let vocab = self.vocab.clone();
        let stats = self.finish()?;
        let m = Manifest::from_stats(vocab, stats);
        m.write(&dir)?;
        Ok(m)
    }
}
