//! Byte layout of a `.mshard` file (see docs/FORMAT.md): header, chunk table, document index,
//! footer and the per-document record. Pure encode/decode over byte slices, shared by the
//! writer, the reader, `verify()` and the fuzz target; nothing here panics on bad bytes.

use std::path::Path;

use crate::error::{Result, ShardError};
use crate::types::Modality;

/// First 8 bytes of every shard.
pub const MAGIC: [u8; 8] = *b"MOTSHARD";
/// First 8 bytes of the footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"MOTSFOOT";
/// Last 4 bytes of every shard.
pub const END_MAGIC: [u8; 4] = *b"MSE1";
/// Format version written and read by this build.
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const FOOTER_LEN: usize = 160;
pub const CHUNK_ENTRY_LEN: usize = 32;
pub const INDEX_ENTRY_LEN: usize = 16;
pub const RECORD_HEADER_LEN: usize = 8;
pub const SEGMENT_DESC_LEN: usize = 40;
/// Every chunk, record and payload starts at a multiple of this (zero-copy typed slices).
pub const ALIGN: usize = 8;

/// Rounds `n` up to the next multiple of [`ALIGN`].
pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// How chunk payloads are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is: documents are read zero-copy through the memory map.
    Raw,
    /// Each chunk is one independent zstd frame.
    Zstd,
}

impl Compression {
    pub fn code(self) -> u8 {
        match self {
            Compression::Raw => 0,
            Compression::Zstd => 1,
        }
    }
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Compression::Raw),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Raw => "raw",
            Compression::Zstd => "zstd",
        }
    }
}

// --- little-endian helpers over slices that are already bounds-checked ---

fn rd_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}
fn rd_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// The fixed 64-byte header at offset 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub compression: Compression,
    pub chunk_size: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        // 12..16 flags, reserved (0)
        b[16] = self.compression.code();
        b[20..24].copy_from_slice(&self.chunk_size.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(path: &Path, file: &[u8]) -> Result<Header> {
        let b = file.get(0..HEADER_LEN).ok_or_else(|| ShardError::Truncated {
            path: path.into(),
            what: "header",
            offset: 0,
            end: HEADER_LEN as u64,
            len: file.len() as u64,
        })?;
        if b[0..8] != MAGIC {
            return Err(ShardError::corrupt(
                path,
                "header",
                0,
                format!("bad magic {:?}", String::from_utf8_lossy(&b[0..8])),
            ));
        }
        let stored = rd_u32(b, 60);
        let actual = crc32c::crc32c(&b[0..60]);
        if stored != actual {
            return Err(checksum(path, "header", 60, stored, actual));
        }
        let version = rd_u32(b, 8);
        if version != VERSION {
            return Err(ShardError::Version { path: path.into(), found: version, supported: VERSION });
        }
        let compression = Compression::from_code(b[16])
            .ok_or_else(|| ShardError::corrupt(path, "header", 16, format!("unknown compression code {}", b[16])))?;
        Ok(Header { version, compression, chunk_size: rd_u32(b, 20) })
    }
}

/// Per-modality totals kept in the footer and the manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModalityStats {
    /// Documents with at least one segment of this modality.
    pub docs: u64,
    pub segments: u64,
    /// Sequence positions: tokens, or latent patch vectors.
    pub tokens: u64,
}

/// The fixed 160-byte footer at the end of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footer {
    pub compression_code: u8,
    pub num_docs: u64,
    pub num_chunks: u64,
    pub chunk_table_offset: u64,
    pub doc_index_offset: u64,
    pub meta_offset: u64,
    pub meta_len: u64,
    /// Indexed by `Modality::index()`.
    pub stats: [ModalityStats; 3],
    /// Sum of uncompressed chunk lengths.
    pub payload_bytes: u64,
    /// crc32c over the chunk table bytes followed by the document index bytes.
    pub index_crc: u32,
    pub meta_crc: u32,
}

impl Footer {
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(&FOOTER_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12] = self.compression_code;
        let words = [
            self.num_docs,
            self.num_chunks,
            self.chunk_table_offset,
            self.doc_index_offset,
            self.meta_offset,
            self.meta_len,
        ];
        for (i, w) in words.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        for (m, s) in self.stats.iter().enumerate() {
            let at = 64 + 24 * m;
            b[at..at + 8].copy_from_slice(&s.docs.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&s.segments.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&s.tokens.to_le_bytes());
        }
        b[136..144].copy_from_slice(&self.payload_bytes.to_le_bytes());
        b[144..148].copy_from_slice(&self.index_crc.to_le_bytes());
        b[148..152].copy_from_slice(&self.meta_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..152]);
        b[152..156].copy_from_slice(&crc.to_le_bytes());
        b[156..160].copy_from_slice(&END_MAGIC);
        b
    }

    /// Decodes and checks the footer at the end of `file`, including that every region it
    /// points at lies inside the file and the regions do not overlap.
    pub fn decode(path: &Path, file: &[u8]) -> Result<Footer> {
        let len = file.len() as u64;
        if file.len() < HEADER_LEN + FOOTER_LEN {
            return Err(ShardError::Truncated {
                path: path.into(),
                what: "header+footer",
                offset: 0,
                end: (HEADER_LEN + FOOTER_LEN) as u64,
                len,
            });
        }
        let at = file.len() - FOOTER_LEN;
        let b = &file[at..];
        if b[156..160] != END_MAGIC || b[0..8] != FOOTER_MAGIC {
            return Err(ShardError::corrupt(
                path,
                "footer",
                at as u64,
                "bad footer magic (file truncated or not finished)",
            ));
        }
        let stored = rd_u32(b, 152);
        let actual = crc32c::crc32c(&b[0..152]);
        if stored != actual {
            return Err(checksum(path, "footer", (at + 152) as u64, stored, actual));
        }
        let version = rd_u32(b, 8);
        if version != VERSION {
            return Err(ShardError::Version { path: path.into(), found: version, supported: VERSION });
        }
        let mut stats = [ModalityStats::default(); 3];
        for (m, s) in stats.iter_mut().enumerate() {
            let o = 64 + 24 * m;
            *s = ModalityStats { docs: rd_u64(b, o), segments: rd_u64(b, o + 8), tokens: rd_u64(b, o + 16) };
        }
        let f = Footer {
            compression_code: b[12],
            num_docs: rd_u64(b, 16),
            num_chunks: rd_u64(b, 24),
            chunk_table_offset: rd_u64(b, 32),
            doc_index_offset: rd_u64(b, 40),
            meta_offset: rd_u64(b, 48),
            meta_len: rd_u64(b, 56),
            stats,
            payload_bytes: rd_u64(b, 136),
            index_crc: rd_u32(b, 144),
            meta_crc: rd_u32(b, 148),
        };
        // Region checks: chunk table, then doc index, then meta, then footer.
        let foot_at = at as u64;
        let table_len = f.num_chunks.checked_mul(CHUNK_ENTRY_LEN as u64);
        let index_len = f.num_docs.checked_mul(INDEX_ENTRY_LEN as u64);
        let (Some(table_len), Some(index_len)) = (table_len, index_len) else {
            return Err(ShardError::corrupt(path, "footer", foot_at, "chunk or document count overflows"));
        };
        let table_end = f.chunk_table_offset.checked_add(table_len);
        let index_end = f.doc_index_offset.checked_add(index_len);
        let meta_end = f.meta_offset.checked_add(f.meta_len);
        let ok = matches!((table_end, index_end, meta_end), (Some(te), Some(ie), Some(me))
            if f.chunk_table_offset >= HEADER_LEN as u64
                && te == f.doc_index_offset
                && ie <= f.meta_offset
                && me <= foot_at
                && f.chunk_table_offset.is_multiple_of(ALIGN as u64));
        if !ok {
            return Err(ShardError::corrupt(
                path,
                "footer",
                foot_at,
                format!(
                    "regions out of order or past the footer: chunk table @{} ({} chunks), index @{} ({} docs), meta @{}+{}, footer @{}",
                    f.chunk_table_offset,
                    f.num_chunks,
                    f.doc_index_offset,
                    f.num_docs,
                    f.meta_offset,
                    f.meta_len,
                    foot_at
                ),
            ));
        }
        if Compression::from_code(f.compression_code).is_none() {
            return Err(ShardError::corrupt(path, "footer", foot_at + 12, "unknown compression code"));
        }
        Ok(f)
    }
}

/// One entry of the chunk table (32 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    pub file_offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    /// crc32c of the stored (possibly compressed) bytes.
    pub crc: u32,
    pub first_doc: u64,
}

impl ChunkEntry {
    pub fn encode(&self) -> [u8; CHUNK_ENTRY_LEN] {
        let mut b = [0u8; CHUNK_ENTRY_LEN];
        b[0..8].copy_from_slice(&self.file_offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.stored_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.crc.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_doc.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> ChunkEntry {
        ChunkEntry {
            file_offset: rd_u64(b, 0),
            stored_len: rd_u32(b, 8),
            raw_len: rd_u32(b, 12),
            crc: rd_u32(b, 16),
            first_doc: rd_u64(b, 24),
        }
    }
}

/// One entry of the document index (16 bytes): where the document's record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub chunk: u32,
    /// Offset of the record inside the uncompressed chunk.
    pub offset: u32,
    pub len: u32,
    /// Sequence positions in the document (sum of segment lengths).
    pub positions: u32,
}

impl IndexEntry {
    pub fn encode(&self) -> [u8; INDEX_ENTRY_LEN] {
        let mut b = [0u8; INDEX_ENTRY_LEN];
        b[0..4].copy_from_slice(&self.chunk.to_le_bytes());
        b[4..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.positions.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> IndexEntry {
        IndexEntry { chunk: rd_u32(b, 0), offset: rd_u32(b, 4), len: rd_u32(b, 8), positions: rd_u32(b, 12) }
    }
}

/// Segment payload kind on disk.
pub const KIND_TOKENS: u8 = 0;
pub const KIND_LATENT_F16: u8 = 1;
pub const FLAG_GRID: u8 = 1;
pub const FLAG_FRAME_RATE: u8 = 2;
pub const FLAG_SOURCE: u8 = 4;

/// One 40-byte segment descriptor inside a document record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmentDesc {
    pub modality: Modality,
    pub kind: u8,
    /// Bytes per element: 1, 2 or 4 for token ids, 2 for f16 latents.
    pub width: u8,
    pub flags: u8,
    /// Sequence positions: tokens or latent vectors.
    pub len: u32,
    pub dim: u32,
    pub grid: (u16, u16),
    pub frame_rate: f32,
    pub payload_offset: u32,
    pub payload_bytes: u32,
    pub source_offset: u32,
    pub source_len: u32,
}

impl SegmentDesc {
    pub fn encode(&self) -> [u8; SEGMENT_DESC_LEN] {
        let mut b = [0u8; SEGMENT_DESC_LEN];
        b[0] = self.modality as u8;
        b[1] = self.kind;
        b[2] = self.width;
        b[3] = self.flags;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..12].copy_from_slice(&self.dim.to_le_bytes());
        b[12..14].copy_from_slice(&self.grid.0.to_le_bytes());
        b[14..16].copy_from_slice(&self.grid.1.to_le_bytes());
        b[16..20].copy_from_slice(&self.frame_rate.to_le_bytes());
        b[20..24].copy_from_slice(&self.payload_offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_bytes.to_le_bytes());
        b[28..32].copy_from_slice(&self.source_offset.to_le_bytes());
        b[32..36].copy_from_slice(&self.source_len.to_le_bytes());
        b
    }

    /// Reads descriptor `i` of an already validated record (no checks).
    pub(crate) fn read(record: &[u8], i: usize) -> SegmentDesc {
        let at = RECORD_HEADER_LEN + i * SEGMENT_DESC_LEN;
        let b = record.get(at..at + SEGMENT_DESC_LEN).unwrap_or(&[0u8; SEGMENT_DESC_LEN]);
        SegmentDesc {
            modality: Modality::from_u8(b[0]).unwrap_or(Modality::Text),
            kind: b[1],
            width: b[2],
            flags: b[3],
            len: rd_u32(b, 4),
            dim: rd_u32(b, 8),
            grid: (rd_u16(b, 12), rd_u16(b, 14)),
            frame_rate: f32::from_le_bytes(rd_u32(b, 16).to_le_bytes()),
            payload_offset: rd_u32(b, 20),
            payload_bytes: rd_u32(b, 24),
            source_offset: rd_u32(b, 28),
            source_len: rd_u32(b, 32),
        }
    }
}

/// Number of segments of a validated record.
pub(crate) fn record_segments(record: &[u8]) -> usize {
    rd_u32(record, 0) as usize
}

/// Checks a document record completely, so the accessors can trust it afterwards.
/// `base` is the record's absolute offset (in the file, or in the uncompressed chunk) for errors.
/// Returns the number of sequence positions.
pub fn validate_record(path: &Path, base: u64, record: &[u8]) -> Result<u64> {
    let bad = |at: usize, detail: String| ShardError::corrupt(path, "document record", base + at as u64, detail);
    if record.len() < RECORD_HEADER_LEN {
        return Err(bad(0, format!("record of {} bytes is shorter than its header", record.len())));
    }
    let n = rd_u32(record, 0) as usize;
    let table_end = n
        .checked_mul(SEGMENT_DESC_LEN)
        .and_then(|t| t.checked_add(RECORD_HEADER_LEN))
        .filter(|&e| e <= record.len())
        .ok_or_else(|| bad(0, format!("{n} segment descriptors do not fit in {} bytes", record.len())))?;
    let mut positions = 0u64;
    for i in 0..n {
        let at = RECORD_HEADER_LEN + i * SEGMENT_DESC_LEN;
        let b = &record[at..at + SEGMENT_DESC_LEN];
        if Modality::from_u8(b[0]).is_none() {
            return Err(bad(at, format!("segment {i}: unknown modality {}", b[0])));
        }
        let d = SegmentDesc::read(record, i);
        let elems = match (d.kind, d.width) {
            (KIND_TOKENS, 1 | 2 | 4) if d.dim == 0 => d.len as u64,
            (KIND_LATENT_F16, 2) if d.dim > 0 => d.len as u64 * d.dim as u64,
            _ => return Err(bad(at, format!("segment {i}: bad kind {} / width {} / dim {}", d.kind, d.width, d.dim))),
        };
        if elems * d.width as u64 != d.payload_bytes as u64 {
            return Err(bad(
                at,
                format!("segment {i}: payload of {} bytes does not hold {elems} elements", d.payload_bytes),
            ));
        }
        let p_end = d.payload_offset as u64 + d.payload_bytes as u64;
        if (d.payload_offset as usize) < table_end
            || p_end > record.len() as u64
            || !(d.payload_offset as usize).is_multiple_of(ALIGN)
        {
            return Err(bad(
                at,
                format!("segment {i}: payload {}..{p_end} outside the record or misaligned", d.payload_offset),
            ));
        }
        if d.flags & FLAG_SOURCE != 0 {
            let s_end = d.source_offset as u64 + d.source_len as u64;
            let ok = (d.source_offset as usize) >= table_end
                && s_end <= record.len() as u64
                && std::str::from_utf8(&record[d.source_offset as usize..s_end as usize]).is_ok();
            if !ok {
                return Err(bad(at, format!("segment {i}: source string {}..{s_end} invalid", d.source_offset)));
            }
        }
        positions += d.len as u64;
    }
    Ok(positions)
}

pub(crate) fn checksum(path: &Path, what: &'static str, offset: u64, expected: u32, actual: u32) -> ShardError {
    ShardError::Checksum {
        path: path.into(),
        what,
        offset,
        expected: format!("crc32c:{expected:08x}"),
        actual: format!("crc32c:{actual:08x}"),
    }
}

/// Smallest element width (bytes) that holds every id of a vocabulary of `vocab_size`.
pub fn id_width(vocab_size: u32) -> u8 {
    if vocab_size <= 1 << 8 {
        1
    } else if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

#[cfg(target_endian = "big")]
compile_error!("motley-shards reads little-endian payloads zero-copy and needs a little-endian host");

/// Recomputes every checksum of a (possibly mangled) shard image in place, wherever the
/// footer's offsets allow. Only for fuzzing: it lets mutated inputs get past the checksums so
/// the structural parser behind them is exercised. Never panics.
#[doc(hidden)]
pub fn fixup_checksums(file: &mut [u8]) {
    if file.len() < HEADER_LEN + FOOTER_LEN {
        return;
    }
    let crc = crc32c::crc32c(&file[0..60]);
    file[60..64].copy_from_slice(&crc.to_le_bytes());
    let at = file.len() - FOOTER_LEN;
    let f = |o: usize| rd_u64(&file[at..], o);
    let (num_docs, num_chunks, table, index, meta, meta_len) = (f(16), f(24), f(32), f(40), f(48), f(56));
    let table_end = num_chunks.checked_mul(CHUNK_ENTRY_LEN as u64).and_then(|l| table.checked_add(l));
    let index_end = num_docs.checked_mul(INDEX_ENTRY_LEN as u64).and_then(|l| index.checked_add(l));
    if let (Some(te), Some(ie)) = (table_end, index_end)
        && te <= at as u64
        && ie <= at as u64
        && table <= te
        && te <= index.max(te)
    {
        for c in 0..num_chunks as usize {
            let e = table as usize + c * CHUNK_ENTRY_LEN;
            let entry = ChunkEntry::decode(&file[e..e + CHUNK_ENTRY_LEN]);
            let end = entry.file_offset.checked_add(entry.stored_len as u64);
            if let Some(end) = end.filter(|&x| x <= at as u64) {
                let crc = crc32c::crc32c(&file[entry.file_offset as usize..end as usize]);
                file[e + 16..e + 20].copy_from_slice(&crc.to_le_bytes());
            }
        }
        if te == index {
            let crc = crc32c::crc32c(&file[table as usize..ie as usize]);
            file[at + 144..at + 148].copy_from_slice(&crc.to_le_bytes());
        }
    }
    if let Some(me) = meta.checked_add(meta_len).filter(|&e| e <= at as u64) {
        let crc = crc32c::crc32c(&file[meta as usize..me as usize]);
        file[at + 148..at + 152].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32c::crc32c(&file[at..at + 152]);
    file[at + 152..at + 156].copy_from_slice(&crc.to_le_bytes());
}
