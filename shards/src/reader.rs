//! The memory-mapped reader: `Corpus::open` reads only the manifest; each shard is mapped and
//! its footer checked the first time a document in it is touched. Documents come back as
//! borrowed views (`DocumentRef`), zero-copy for raw shards.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use half::f16;
use serde::Serialize;

use crate::cache::{ChunkBuf, ChunkCache, DEFAULT_CHUNK_CACHE_BYTES, next_reader_id};
use crate::error::{Result, ShardError};
use crate::format::{
    self, ALIGN, CHUNK_ENTRY_LEN, ChunkEntry, Compression, FLAG_FRAME_RATE, FLAG_GRID, FLAG_SOURCE, Footer, Header,
    INDEX_ENTRY_LEN, IndexEntry, KIND_LATENT_F16, ModalityStats, SegmentDesc, SegmentRules, validate_record,
};
use crate::manifest::{Manifest, read_meta_vocab};
use crate::perm::{Permutation, mix64};
use crate::store::ShardStore;
use crate::types::{Document, Modality, Segment, SegmentData, SegmentMeta, Vocab};
use crate::writer::PerModality;

/// Bytes of one shard: a read-only memory map, or an owned 8-aligned buffer (tests, fuzzing).
#[derive(Debug)]
enum Storage {
    Map(memmap2::Mmap),
    Owned(Vec<u64>, usize),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Map(m) => m,
            Storage::Owned(v, len) => {
                let b: &[u8] = bytemuck::cast_slice(v);
                &b[..*len]
            }
        }
    }
}

/// One opened shard. Opening checks header, footer, the index checksum, the meta block's
/// vocabulary and that the chunk table's sizes add up (cost proportional to this shard's
/// document and chunk count, paid on first touch); chunk checksums are checked the first time
/// each chunk is read, and every document's token ids the first time it is read.
#[derive(Debug)]
pub struct ShardReader {
    path: PathBuf,
    storage: Storage,
    header: Header,
    footer: Footer,
    vocab: Vocab,
    rules: SegmentRules,
    verified: Vec<AtomicU64>,
    /// One bit per document: its ids were checked against the vocabulary. Every later read
    /// still checks the record's structure, which is O(segments), but not each id again (the
    /// loader reads a long document once per row it spans).
    ids_checked: Vec<AtomicU64>,
    /// Decoded zstd chunks: the corpus's shared cache, or a private one keeping the last chunk.
    cache: Arc<ChunkCache>,
    cache_id: u64,
}

impl ShardReader {
    /// Maps and checks a shard file (decoded zstd chunks: the last one is kept).
    pub fn open(path: impl AsRef<Path>) -> Result<ShardReader> {
        Self::open_with_cache(path, Arc::new(ChunkCache::new(0)))
    }

    /// [`ShardReader::open`] keeping decoded zstd chunks in `cache` (shared by a corpus).
    pub fn open_with_cache(path: impl AsRef<Path>, cache: Arc<ChunkCache>) -> Result<ShardReader> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ShardError::MissingShard { path: path.clone() },
            _ => ShardError::io(&path, "open", e),
        })?;
        // SAFETY: shards are immutable once renamed into place and only ever mapped read-only.
        // A concurrent truncation by another process would be a misuse outside this crate.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ShardError::io(&path, "mmap", e))?;
        Self::from_storage(path, Storage::Map(map), cache)
    }

    /// A shard held in memory; `label` names it in errors.
    pub fn from_bytes(label: impl Into<PathBuf>, bytes: &[u8]) -> Result<ShardReader> {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self::from_storage(label.into(), Storage::Owned(words, bytes.len()), Arc::new(ChunkCache::new(0)))
    }

    fn from_storage(path: PathBuf, storage: Storage, cache: Arc<ChunkCache>) -> Result<ShardReader> {
        let bytes = storage.bytes();
        let header = Header::decode(&path, bytes)?;
        let footer = Footer::decode(&path, bytes)?;
        if footer.compression_code != header.compression.code() {
            return Err(ShardError::corrupt(
                &path,
                "footer",
                (bytes.len() - format::FOOTER_LEN + 12) as u64,
                "compression differs from the header",
            ));
        }
        // Footer::decode checked that the table and the index lie inside the file.
        let (start, end) = (footer.chunk_table_offset as usize, footer.index_end() as usize);
        let index = bytes.get(start..end).ok_or_else(|| {
            ShardError::corrupt(&path, "footer", footer.chunk_table_offset, "chunk table and index outside the file")
        })?;
        let actual = crc32c::crc32c(index);
        if actual != footer.index_crc {
            return Err(format::checksum(&path, "index", footer.chunk_table_offset, footer.index_crc, actual));
        }
        // The uncompressed sizes the chunk table claims must add up to the footer's total:
        // a zstd chunk cannot claim more than its share of `payload_bytes`.
        let table = index.get(..footer.num_chunks as usize * CHUNK_ENTRY_LEN).unwrap_or(&[]);
        let claimed = table
            .chunks_exact(CHUNK_ENTRY_LEN)
            .try_fold(0u64, |sum, e| sum.checked_add(ChunkEntry::decode(e).raw_len as u64));
        if claimed != Some(footer.payload_bytes) {
            return Err(ShardError::corrupt(
                &path,
                "chunk table",
                footer.chunk_table_offset,
                format!(
                    "uncompressed chunk sizes add up to {}, the footer's payload_bytes is {}",
                    claimed.map_or("more than 2^64".to_string(), |c| c.to_string()),
                    footer.payload_bytes
                ),
            ));
        }
        let vocab = read_meta_vocab(&path, bytes, &footer)?;
        let rules = SegmentRules::from_vocab(&vocab);
        let bitmap = |n: u64| -> Vec<AtomicU64> { (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect() };
        let (verified, ids_checked) = (bitmap(footer.num_chunks), bitmap(footer.num_docs));
        Ok(ShardReader {
            path,
            storage,
            header,
            footer,
            vocab,
            rules,
            verified,
            ids_checked,
            cache,
            cache_id: next_reader_id(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn num_docs(&self) -> u64 {
        self.footer.num_docs
    }
    pub fn num_chunks(&self) -> u64 {
        self.footer.num_chunks
    }
    pub fn compression(&self) -> Compression {
        self.header.compression
    }
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    pub fn len_bytes(&self) -> u64 {
        self.storage.bytes().len() as u64
    }
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }
    /// Per-modality statistics from the footer.
    pub fn stats(&self) -> PerModality {
        PerModality::from_array(self.footer.stats)
    }
    /// The vocabulary recorded in the shard's meta block (checked when the shard was opened).
    pub fn vocab(&self) -> Result<Vocab> {
        Ok(self.vocab.clone())
    }

    /// Checks the footer and meta block against the shard's manifest entry and vocabulary.
    pub fn check_against(&self, entry: &crate::writer::ShardStats, vocab: &Vocab) -> Result<()> {
        let mismatch = |field: &'static str, manifest: String, actual: String| ShardError::ManifestMismatch {
            path: self.path.clone(),
            field,
            manifest,
            actual,
        };
        if self.len_bytes() != entry.bytes {
            return Err(mismatch("bytes", entry.bytes.to_string(), self.len_bytes().to_string()));
        }
        if self.num_docs() != entry.num_docs {
            return Err(mismatch("num_docs", entry.num_docs.to_string(), self.num_docs().to_string()));
        }
        if self.num_chunks() != entry.num_chunks {
            return Err(mismatch("num_chunks", entry.num_chunks.to_string(), self.num_chunks().to_string()));
        }
        if self.compression() != entry.compression {
            return Err(mismatch("compression", entry.compression.as_str().into(), self.compression().as_str().into()));
        }
        if self.footer.payload_bytes != entry.payload_bytes {
            return Err(mismatch(
                "payload_bytes",
                entry.payload_bytes.to_string(),
                self.footer.payload_bytes.to_string(),
            ));
        }
        if self.stats() != entry.modalities {
            return Err(mismatch("modalities", format!("{:?}", entry.modalities), format!("{:?}", self.stats())));
        }
        if &self.vocab != vocab {
            return Err(mismatch("vocab", format!("{vocab:?}"), format!("{:?}", self.vocab)));
        }
        Ok(())
    }

    /// Index entry of document `local` (O(1): read from the mapped index).
    pub fn index_entry(&self, local: u64) -> Result<IndexEntry> {
        if local >= self.footer.num_docs {
            return Err(ShardError::DocOutOfRange { doc: local, num_docs: self.footer.num_docs });
        }
        // In the file: local < num_docs and Footer::decode checked the index's extent.
        let at = (self.footer.doc_index_offset + local * INDEX_ENTRY_LEN as u64) as usize;
        Ok(IndexEntry::decode(self.storage.bytes().get(at..at + INDEX_ENTRY_LEN).unwrap_or(&[])))
    }

    /// Chunk table entry `i`, checked against the file layout.
    pub fn chunk_entry(&self, i: u64) -> Result<ChunkEntry> {
        if i >= self.footer.num_chunks {
            return Err(ShardError::corrupt(
                &self.path,
                "document index",
                self.footer.doc_index_offset,
                format!("chunk {i} of {}", self.footer.num_chunks),
            ));
        }
        // In the file: i < num_chunks and Footer::decode checked the table's extent.
        let at = self.footer.chunk_table_offset + i * CHUNK_ENTRY_LEN as u64;
        let c = ChunkEntry::decode(self.storage.bytes().get(at as usize..at as usize + CHUNK_ENTRY_LEN).unwrap_or(&[]));
        let end = c.file_offset.checked_add(c.stored_len as u64);
        // How much a zstd chunk may claim is bounded by its frame (see `decompressed`).
        let ok = c.file_offset >= format::HEADER_LEN as u64
            && end.is_some_and(|e| e <= self.footer.chunk_table_offset)
            && c.file_offset.is_multiple_of(ALIGN as u64)
            && (self.header.compression != Compression::Raw || c.stored_len == c.raw_len);
        if !ok {
            return Err(ShardError::corrupt(
                &self.path,
                "chunk table",
                at,
                format!(
                    "chunk {i} at {}+{} (raw {}) lies outside the data region",
                    c.file_offset, c.stored_len, c.raw_len
                ),
            ));
        }
        Ok(c)
    }

    /// Chunk `i`'s stored bytes, crc-checked on first use; `c` comes from `chunk_entry`, which
    /// checked that they lie inside the file.
    fn stored_chunk(&self, i: u64, c: &ChunkEntry) -> Result<&[u8]> {
        let range = c.file_offset as usize..c.file_offset.saturating_add(c.stored_len as u64) as usize;
        let bytes = self.storage.bytes().get(range).ok_or_else(|| {
            ShardError::corrupt(&self.path, "chunk table", c.file_offset, format!("chunk {i} outside the file"))
        })?;
        let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        let done = self.verified.get(word).is_some_and(|w| w.load(Ordering::Relaxed) & bit != 0);
        if !done {
            let actual = crc32c::crc32c(bytes);
            if actual != c.crc {
                return Err(format::checksum(&self.path, "chunk", c.file_offset, c.crc, actual));
            }
            if let Some(w) = self.verified.get(word) {
                w.fetch_or(bit, Ordering::Relaxed);
            }
        }
        Ok(bytes)
    }

    fn decompressed(&self, i: u64, c: &ChunkEntry) -> Result<Arc<ChunkBuf>> {
        if let Some(buf) = self.cache.get((self.cache_id, i)) {
            return Ok(buf);
        }
        let stored = self.stored_chunk(i, c)?;
        let bad = |detail: String| ShardError::corrupt(&self.path, "zstd chunk", c.file_offset, detail);
        check_zstd_claim(stored, c).map_err(bad)?;
        let mut words = self.cache.buffer((c.raw_len as usize).div_ceil(8));
        let dst = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..c.raw_len as usize];
        let n = DECOMPRESSOR
            .with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new()?);
                }
                match d.as_mut() {
                    Some(d) => d.decompress_to_buffer(stored, dst),
                    None => Err(std::io::Error::other("no zstd decompressor")),
                }
            })
            .map_err(|e| bad(e.to_string()))?;
        if n != c.raw_len as usize {
            return Err(bad(format!("decompressed to {n} bytes, chunk table says {}", c.raw_len)));
        }
        let buf = Arc::new(ChunkBuf { words, len: n });
        self.cache.insert((self.cache_id, i), buf.clone());
        Ok(buf)
    }

    /// Decodes (into the cache) the zstd chunks holding documents `docs` of this shard, so a
    /// reader that comes for them finds them decoded. Errors are left for that reader.
    pub fn warm(&self, docs: std::ops::Range<u64>) {
        if self.header.compression != Compression::Zstd || docs.is_empty() {
            return;
        }
        let chunk = |d: u64| self.index_entry(d).map(|e| e.chunk as u64);
        let (Ok(first), Ok(last)) = (chunk(docs.start), chunk(docs.end - 1)) else { return };
        for i in first..=last.min(self.footer.num_chunks.saturating_sub(1)) {
            if self.cache.contains((self.cache_id, i)) {
                continue;
            }
            let Ok(c) = self.chunk_entry(i) else { return };
            if self.decompressed(i, &c).is_err() {
                return;
            }
        }
    }

    /// Chunk `i` checked as a whole: its table entry, its crc32c and, for zstd, that its frame
    /// can decode to the size the table claims (what `verify` checks per chunk).
    pub fn check_chunk(&self, i: u64) -> Result<ChunkEntry> {
        let c = self.chunk_entry(i)?;
        let stored = self.stored_chunk(i, &c)?;
        if self.header.compression == Compression::Zstd {
            check_zstd_claim(stored, &c)
                .map_err(|detail| ShardError::corrupt(&self.path, "zstd chunk", c.file_offset, detail))?;
        }
        Ok(c)
    }

    /// Document `local` of this shard as a validated borrowed view. A structural error names
    /// the document ([`ShardError::Record`]); checksum errors name the chunk.
    pub fn get(&self, local: u64) -> Result<DocumentRef<'_>> {
        self.get_inner(local, None).map_err(|e| e.in_document(local))
    }

    /// [`ShardReader::get`] holding the reader alive instead of borrowing it, so the corpus may
    /// release the shard (a remote cache evicting it) while documents are still in use.
    pub fn get_shared(self: &Arc<Self>, local: u64) -> Result<DocumentRef<'static>> {
        let d = self.get_inner(local, Some(self)).map_err(|e| e.in_document(local))?;
        let bytes = match d.bytes {
            DocBytes::Shard(r, s, e) => DocBytes::Shard(r, s, e),
            DocBytes::Chunk(b, s, e) => DocBytes::Chunk(b, s, e),
            DocBytes::Mapped(_) => return Err(ShardError::Config("internal: borrowed record".into())),
        };
        Ok(DocumentRef { bytes, positions: d.positions })
    }

    fn get_inner<'a>(&'a self, local: u64, owner: Option<&Arc<ShardReader>>) -> Result<DocumentRef<'a>> {
        let e = self.index_entry(local)?;
        let c = self.chunk_entry(e.chunk as u64)?;
        let index_at = self.footer.doc_index_offset + local * INDEX_ENTRY_LEN as u64;
        let end = e.offset as u64 + e.len as u64; // two u32s: no overflow in u64
        if end > c.raw_len as u64 || !(e.offset as usize).is_multiple_of(ALIGN) {
            return Err(ShardError::corrupt(
                &self.path,
                "document index entry",
                index_at,
                format!("record {}..{end} outside chunk {} of {} bytes", e.offset, e.chunk, c.raw_len),
            ));
        }
        let (bytes, base, in_chunk) = match self.header.compression {
            Compression::Raw => {
                let chunk = self.stored_chunk(e.chunk as u64, &c)?;
                let rec = chunk.get(e.offset as usize..end as usize).unwrap_or(&[]);
                let at = c.file_offset + e.offset as u64;
                let bytes = match owner {
                    // In the file: stored_chunk checked the chunk's extent, and end <= raw_len.
                    Some(o) => DocBytes::Shard(o.clone(), at as usize, at as usize + rec.len()),
                    None => DocBytes::Mapped(rec),
                };
                (bytes, at, None)
            }
            Compression::Zstd => {
                let buf = self.decompressed(e.chunk as u64, &c)?;
                (DocBytes::Chunk(buf, e.offset as usize, end as usize), e.offset as u64, Some(e.chunk))
            }
        };
        let (word, bit) = ((local / 64) as usize, 1u64 << (local % 64));
        let checked = self.ids_checked.get(word).is_some_and(|w| w.load(Ordering::Relaxed) & bit != 0);
        let record_error = |at: u64, detail: String| ShardError::Record {
            path: self.path.clone(),
            doc: local,
            global: None,
            what: "document record",
            offset: base + at,
            in_chunk,
            detail,
        };
        let positions =
            validate_record(bytes.get(), &self.rules, !checked).map_err(|p| record_error(p.at, p.detail))?;
        if positions.min(u32::MAX as u64) != e.positions as u64 {
            return Err(ShardError::corrupt(
                &self.path,
                "document index entry",
                index_at + 12,
                format!("says {} positions, the record holds {positions}", e.positions),
            ));
        }
        if !checked && let Some(w) = self.ids_checked.get(word) {
            w.fetch_or(bit, Ordering::Relaxed);
        }
        Ok(DocumentRef { bytes, positions })
    }
}

impl Drop for ShardReader {
    fn drop(&mut self) {
        // A shared cache outlives its readers: their chunks would never be hit again.
        if Arc::strong_count(&self.cache) > 1 {
            self.cache.forget(self.cache_id);
        }
    }
}

thread_local! {
    /// One zstd context per thread: creating one per chunk (what `zstd::bulk::decompress_to_buffer`
    /// does) allocates and faults in its ~100 KiB workspace every time.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// A zstd chunk's claimed size against its frame: the frame's content size must equal the
/// table's `raw_len`, which must not exceed what the frame's blocks can decode to.
fn check_zstd_claim(stored: &[u8], c: &ChunkEntry) -> std::result::Result<(), String> {
    let bound = format::zstd_frame_bound(stored)?;
    if c.raw_len as u64 > bound {
        return Err(format!(
            "chunk table claims {} uncompressed bytes, but this {}-byte zstd frame decodes to at most {bound}",
            c.raw_len, c.stored_len
        ));
    }
    match zstd::zstd_safe::get_frame_content_size(stored) {
        Ok(Some(n)) if n == c.raw_len as u64 => Ok(()),
        other => Err(format!("frame content size {other:?}, chunk table says {}", c.raw_len)),
    }
}

#[derive(Debug)]
enum DocBytes<'a> {
    Mapped(&'a [u8]),
    Shard(Arc<ShardReader>, usize, usize),
    Chunk(Arc<ChunkBuf>, usize, usize),
}

impl DocBytes<'_> {
    fn get(&self) -> &[u8] {
        match self {
            DocBytes::Mapped(b) => b,
            DocBytes::Shard(r, s, e) => r.bytes().get(*s..*e).unwrap_or(&[]),
            DocBytes::Chunk(buf, s, e) => &buf.bytes()[*s..*e],
        }
    }
}

/// A borrowed, validated view of one document.
#[derive(Debug)]
pub struct DocumentRef<'a> {
    bytes: DocBytes<'a>,
    positions: u64,
}

impl DocumentRef<'_> {
    pub fn num_segments(&self) -> usize {
        format::record_segments(self.bytes.get())
    }

    /// Sequence positions (tokens + latent vectors) over all segments.
    pub fn num_positions(&self) -> u64 {
        self.positions
    }

    pub fn segment(&self, i: usize) -> Option<SegmentRef<'_>> {
        (i < self.num_segments()).then(|| {
            let rec = self.bytes.get();
            SegmentRef { rec, desc: SegmentDesc::read(rec, i) }
        })
    }

    pub fn segments(&self) -> impl ExactSizeIterator<Item = SegmentRef<'_>> + '_ {
        let rec = self.bytes.get();
        (0..self.num_segments()).map(move |i| SegmentRef { rec, desc: SegmentDesc::read(rec, i) })
    }

    /// Copies the document out into an owned [`Document`].
    #[allow(clippy::should_implement_trait)]
    pub fn to_owned(&self) -> Document {
        Document { segments: self.segments().map(|s| s.to_owned()).collect() }
    }
}

/// Borrowed token ids at their stored width.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ids<'a> {
    U8(&'a [u8]),
    U16(&'a [u16]),
    U32(&'a [u32]),
}

impl Ids<'_> {
    pub fn len(&self) -> usize {
        match self {
            Ids::U8(s) => s.len(),
            Ids::U16(s) => s.len(),
            Ids::U32(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, i: usize) -> Option<u32> {
        match self {
            Ids::U8(s) => s.get(i).map(|&v| v as u32),
            Ids::U16(s) => s.get(i).map(|&v| v as u32),
            Ids::U32(s) => s.get(i).copied(),
        }
    }
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Ids::U8(s) => s.iter().map(|&v| v as u32).collect(),
            Ids::U16(s) => s.iter().map(|&v| v as u32).collect(),
            Ids::U32(s) => s.to_vec(),
        }
    }
    /// Appends `ids[start..start + n] + offset` to `out` (the loader's hot loop).
    pub fn extend_offset(&self, start: usize, n: usize, offset: u32, out: &mut Vec<u32>) {
        match self {
            Ids::U8(s) => out.extend(s[start..start + n].iter().map(|&v| v as u32 + offset)),
            Ids::U16(s) => out.extend(s[start..start + n].iter().map(|&v| v as u32 + offset)),
            Ids::U32(s) => out.extend(s[start..start + n].iter().map(|&v| v.wrapping_add(offset))),
        }
    }
    /// Writes `ids[start..start + out.len()] + offset` into `out`.
    pub fn copy_offset(&self, start: usize, offset: u32, out: &mut [u32]) {
        let n = out.len();
        match self {
            Ids::U8(s) => out.iter_mut().zip(&s[start..start + n]).for_each(|(o, &v)| *o = v as u32 + offset),
            Ids::U16(s) => out.iter_mut().zip(&s[start..start + n]).for_each(|(o, &v)| *o = v as u32 + offset),
            Ids::U32(s) => out.iter_mut().zip(&s[start..start + n]).for_each(|(o, &v)| *o = v.wrapping_add(offset)),
        }
    }
}

/// Borrowed payload of a segment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SegmentView<'a> {
    Tokens(Ids<'a>),
    /// `len` vectors of `dim` values, row-major.
    Latent {
        dim: u32,
        data: &'a [f16],
    },
}

/// A borrowed view of one segment.
#[derive(Debug, Clone, Copy)]
pub struct SegmentRef<'a> {
    rec: &'a [u8],
    desc: SegmentDesc,
}

impl<'a> SegmentRef<'a> {
    pub fn modality(&self) -> Modality {
        self.desc.modality
    }
    /// Sequence positions: tokens, or latent vectors.
    pub fn len(&self) -> usize {
        self.desc.len as usize
    }
    pub fn is_empty(&self) -> bool {
        self.desc.len == 0
    }
    pub fn is_latent(&self) -> bool {
        self.desc.kind == KIND_LATENT_F16
    }
    pub fn grid(&self) -> Option<(u16, u16)> {
        (self.desc.flags & FLAG_GRID != 0).then_some(self.desc.grid)
    }
    pub fn frame_rate(&self) -> Option<f32> {
        (self.desc.flags & FLAG_FRAME_RATE != 0).then_some(self.desc.frame_rate)
    }
    pub fn source(&self) -> Option<&'a str> {
        if self.desc.flags & FLAG_SOURCE == 0 {
            return None;
        }
        let s = self.desc.source_offset as usize;
        self.rec.get(s..s + self.desc.source_len as usize).and_then(|b| std::str::from_utf8(b).ok())
    }
    pub fn meta(&self) -> SegmentMeta {
        SegmentMeta { grid: self.grid(), frame_rate: self.frame_rate(), source: self.source().map(str::to_string) }
    }
    fn payload(&self) -> &'a [u8] {
        let s = self.desc.payload_offset as usize;
        self.rec.get(s..s + self.desc.payload_bytes as usize).unwrap_or(&[])
    }
    /// The payload, zero-copy (alignment and size were validated when the document was read).
    pub fn data(&self) -> SegmentView<'a> {
        let p = self.payload();
        if self.desc.kind == KIND_LATENT_F16 {
            return SegmentView::Latent { dim: self.desc.dim, data: bytemuck::try_cast_slice(p).unwrap_or(&[]) };
        }
        SegmentView::Tokens(match self.desc.width {
            1 => Ids::U8(p),
            2 => Ids::U16(bytemuck::try_cast_slice(p).unwrap_or(&[])),
            _ => Ids::U32(bytemuck::try_cast_slice(p).unwrap_or(&[])),
        })
    }
    /// Token ids, when the segment is discrete.
    pub fn ids(&self) -> Option<Ids<'a>> {
        match self.data() {
            SegmentView::Tokens(ids) => Some(ids),
            SegmentView::Latent { .. } => None,
        }
    }
    #[allow(clippy::should_implement_trait)]
    pub fn to_owned(&self) -> Segment {
        let data = match self.data() {
            SegmentView::Tokens(ids) => SegmentData::Tokens(ids.to_vec()),
            SegmentView::Latent { dim, data } => SegmentData::Latent { dim, data: data.to_vec() },
        };
        Segment { modality: self.modality(), data, meta: self.meta() }
    }
}

/// A corpus directory opened for reading.
#[derive(Debug)]
pub struct Corpus {
    dir: PathBuf,
    manifest: Manifest,
    /// `starts[i]` = global id of shard i's first document; `starts[n]` = num_docs.
    starts: Vec<u64>,
    /// Opened shards; a slot is emptied again when a shard store lets the shard go.
    shards: Vec<RwLock<Option<Arc<ShardReader>>>>,
    /// Where shard files come from when they are not plain files in `dir` (a remote cache).
    store: Option<Arc<dyn ShardStore>>,
    cache: Arc<ChunkCache>,
    /// Documents read through `get` (what a rank's loader touches; tests and benches).
    reads: AtomicU64,
}

impl Corpus {
    /// Opens a corpus: reads `manifest.json` only. Shards are mapped lazily on first access.
    /// A `scheme://…` location goes to the opener the binary registered
    /// ([`crate::store::set_remote_opener`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Corpus> {
        if let Some(uri) = dir.as_ref().to_str().filter(|s| crate::store::is_remote(s)) {
            return crate::store::open_remote(uri);
        }
        if let Ok(uri) = std::fs::read_to_string(dir.as_ref().join(crate::store::REMOTE_MARKER)) {
            return crate::store::open_remote(uri.trim());
        }
        Self::open_local(dir.as_ref(), None)
    }

    /// A corpus whose manifest is in `dir` and whose shard files `store` provides on demand.
    pub fn open_with_store(dir: impl AsRef<Path>, store: Arc<dyn ShardStore>) -> Result<Corpus> {
        Self::open_local(dir.as_ref(), Some(store))
    }

    fn open_local(dir: &Path, store: Option<Arc<dyn ShardStore>>) -> Result<Corpus> {
        let dir = dir.to_path_buf();
        let manifest = Manifest::read(&dir)?;
        let mut starts = Vec::with_capacity(manifest.shards.len() + 1);
        let mut acc = 0u64;
        for s in &manifest.shards {
            starts.push(acc);
            acc = acc.saturating_add(s.num_docs); // Manifest::read checked the sum fits
        }
        starts.push(acc);
        let shards = manifest.shards.iter().map(|_| RwLock::new(None)).collect();
        let cache = Arc::new(ChunkCache::new(DEFAULT_CHUNK_CACHE_BYTES));
        Ok(Corpus { dir, manifest, starts, shards, store, cache, reads: AtomicU64::new(0) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    pub fn vocab(&self) -> &Vocab {
        &self.manifest.vocab
    }
    pub fn num_docs(&self) -> u64 {
        self.manifest.num_docs
    }
    pub fn num_shards(&self) -> usize {
        self.manifest.shards.len()
    }

    /// Documents read through [`Corpus::get`] so far.
    pub fn docs_read(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The decoded-chunk cache all of this corpus's zstd shards share (its limit is adjustable).
    pub fn chunk_cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Shard index and document index inside it of global document `doc` (O(log shards)).
    pub fn locate(&self, doc: u64) -> Result<(usize, u64)> {
        if doc >= self.num_docs() {
            return Err(ShardError::DocOutOfRange { doc, num_docs: self.num_docs() });
        }
        let i = self.starts.partition_point(|&s| s <= doc) - 1;
        Ok((i, doc - self.starts[i]))
    }

    /// Global id of the first document of shard `i`.
    pub fn shard_start(&self, i: usize) -> Option<u64> {
        self.starts.get(i).copied()
    }

    /// Shard `i`, mapped and checked against the manifest on first use (fetched first when a
    /// store provides the files).
    pub fn shard(&self, i: usize) -> Result<Arc<ShardReader>> {
        let cell = self
            .shards
            .get(i)
            .ok_or(ShardError::DocOutOfRange { doc: i as u64, num_docs: self.num_shards() as u64 })?;
        if let Ok(g) = cell.read()
            && let Some(r) = g.as_ref()
        {
            return Ok(r.clone());
        }
        let mut g = cell.write().map_err(|_| ShardError::Config("shard slot poisoned".into()))?;
        if let Some(r) = g.as_ref() {
            return Ok(r.clone());
        }
        let entry = &self.manifest.shards[i];
        let path = match &self.store {
            Some(store) => store.ensure(i, entry)?,
            None => self.dir.join(&entry.name),
        };
        let r = Arc::new(ShardReader::open_with_cache(path, self.cache.clone())?);
        r.check_against(entry, self.vocab())?;
        *g = Some(r.clone());
        Ok(r)
    }

    /// The local file of shard `i` (fetched first when a store provides the files; then
    /// pinned until [`Corpus::release_path`]).
    pub fn shard_path(&self, i: usize) -> Result<PathBuf> {
        let entry = self
            .manifest
            .shards
            .get(i)
            .ok_or(ShardError::DocOutOfRange { doc: i as u64, num_docs: self.num_shards() as u64 })?;
        match &self.store {
            Some(store) => store.ensure(i, entry),
            None => Ok(self.dir.join(&entry.name)),
        }
    }

    /// Undoes the pin of [`Corpus::shard_path`] (no-op for local corpora).
    pub fn release_path(&self, i: usize) {
        if let Some(store) = &self.store {
            let mapped = self.shards.get(i).is_some_and(|c| c.read().is_ok_and(|g| g.is_some()));
            if !mapped {
                store.released(i);
            }
        }
    }

    /// Whether shard files come from a store (a remote corpus) rather than the directory.
    pub fn has_store(&self) -> bool {
        self.store.is_some()
    }

    /// Lets shard `i` go (remote corpora: its cached file may be evicted; documents still in
    /// use keep their reader alive). A later access opens it again. No-op for local corpora.
    pub fn release(&self, i: usize) {
        let Some(store) = &self.store else { return };
        let was = self.shards.get(i).and_then(|c| c.write().ok().and_then(|mut g| g.take()));
        if was.is_some() {
            store.released(i);
        }
    }

    /// The shards (manifest indexes) a reader will need next, in order: a store fetches ahead.
    pub fn hint(&self, upcoming: &[usize]) {
        if let Some(store) = &self.store {
            store.upcoming(upcoming);
        }
    }

    /// Document `doc` as a view (it keeps its shard mapped while it lives).
    pub fn get(&self, doc: u64) -> Result<DocumentRef<'_>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let (i, local) = self.locate(doc)?;
        self.shard(i)?.get_shared(local).map_err(|e| e.with_global(doc))
    }

    /// Sequence positions of document `doc`, from the index alone (no payload touched).
    pub fn doc_positions(&self, doc: u64) -> Result<u32> {
        let (i, local) = self.locate(doc)?;
        Ok(self.shard(i)?.index_entry(local)?.positions)
    }

    /// Documents in storage order, starting at `start` (resume by passing `DocIter::position`).
    pub fn iter_from(&self, start: u64) -> DocIter<'_> {
        DocIter { corpus: self, order: None, pos: start }
    }

    pub fn iter(&self) -> DocIter<'_> {
        self.iter_from(0)
    }

    /// Documents in a seeded pseudo-random order, starting at position `start` of that order.
    pub fn iter_shuffled(&self, seed: u64, start: u64) -> DocIter<'_> {
        DocIter { corpus: self, order: Some(Permutation::new(self.num_docs(), seed)), pos: start }
    }

    /// Deep check: every shard's blake3, header, footer, index and chunk checksum, every
    /// record, and every manifest total. Returns the problems found (empty when sound).
    pub fn verify(&self) -> VerifyReport {
        crate::verify::verify_corpus(self)
    }
}

/// Whether document `doc` is in the held-out split for `eval_fraction` (a fixed hash of the
/// document id, independent of the loader seed, so the split never moves between runs).
pub fn is_eval_doc(doc: u64, eval_fraction: f64) -> bool {
    if eval_fraction <= 0.0 {
        return false;
    }
    let h = mix64(doc ^ 0x6576_616C_7370_6C74);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < eval_fraction
}

/// Sequential or shuffled document iterator; `position()` is its resumable state.
#[derive(Debug)]
pub struct DocIter<'a> {
    corpus: &'a Corpus,
    order: Option<Permutation>,
    pos: u64,
}

impl DocIter<'_> {
    /// Number of documents already yielded (pass back to `iter_from` / `iter_shuffled`).
    pub fn position(&self) -> u64 {
        self.pos
    }
}

impl<'a> Iterator for DocIter<'a> {
    type Item = Result<(u64, DocumentRef<'a>)>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.corpus.num_docs() {
            return None;
        }
        let doc = self.order.as_ref().map_or(self.pos, |p| p.get(self.pos));
        self.pos += 1;
        Some(self.corpus.get(doc).map(|d| (doc, d)))
    }
}

/// One problem found by [`Corpus::verify`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// Shard file name, when the problem is inside one.
    pub shard: Option<String>,
    /// Error kind (`checksum`, `truncated`, `missing_shard`, `manifest_mismatch`, ...).
    pub kind: String,
    /// Corpus-wide id of the document, when the problem is in one.
    pub doc: Option<u64>,
    pub offset: Option<u64>,
    pub message: String,
}

impl Problem {
    pub fn from_error(shard: Option<&str>, e: &ShardError) -> Problem {
        Problem {
            shard: shard.map(str::to_string),
            kind: e.kind().to_string(),
            doc: e.doc(),
            offset: e.offset(),
            message: e.to_string(),
        }
    }
}

/// Result of a deep verification.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    pub shards: usize,
    pub docs: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Recomputes a shard's per-modality statistics from its records (used by verify).
pub(crate) fn add_doc_stats(doc: &DocumentRef<'_>, stats: &mut [ModalityStats; 3]) {
    let mut seen = [false; 3];
    for s in doc.segments() {
        let st = &mut stats[s.modality().index()];
        st.segments += 1;
        st.tokens += s.len() as u64;
        seen[s.modality().index()] = true;
    }
    for (m, s) in seen.iter().enumerate() {
        if *s {
            stats[m].docs += 1;
        }
    }
}
