//! Byte layout of a `.mshard` file (see docs/FORMAT.md): header, chunk table, document index,
//! footer and the per-document record. Pure encode/decode over byte slices, shared by the
//! writer, the reader, `verify()` and the fuzz target; nothing here panics on bad bytes.

use std::path::Path;

use crate::error::{Result, ShardError};
use crate::types::{Modality, Vocab};

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

fn rd<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = at.checked_add(N).and_then(|end| b.get(at..end)) {
        a.copy_from_slice(s);
    }
    a
}
fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(rd(b, at))
}
fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(rd(b, at))
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(rd(b, at))
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
    /// End of the document index (`doc_index_offset + 16·num_docs`); saturating, so only
    /// meaningful for a footer that [`Footer::decode`] accepted (which checks it fits the file).
    pub fn index_end(&self) -> u64 {
        self.doc_index_offset.saturating_add(self.num_docs.saturating_mul(INDEX_ENTRY_LEN as u64))
    }

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

/// What one modality's segments may hold under the corpus's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModalityRule {
    vocab_size: u32,
    /// The only width token ids of this modality may be stored at (`id_width(vocab_size)`).
    width: u8,
    latent_dim: Option<u32>,
}

/// The vocabulary-dependent rules every segment must satisfy (docs/FORMAT.md, section 4):
/// its modality is in the vocabulary, token ids are below the modality's `vocab_size` and
/// stored at exactly `id_width(vocab_size)` bytes, latent vectors have the modality's
/// `latent_dim`. Without them a reader would hand out global ids in another modality's block
/// (or past the id space) and latent rows the trainer reads with the wrong stride.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentRules {
    per_modality: [Option<ModalityRule>; Modality::COUNT],
}

impl SegmentRules {
    pub fn from_vocab(vocab: &Vocab) -> SegmentRules {
        let mut per_modality = [None; Modality::COUNT];
        for m in Modality::ALL {
            per_modality[m.index()] = vocab.modality(m).map(|v| ModalityRule {
                vocab_size: v.vocab_size,
                width: id_width(v.vocab_size),
                latent_dim: v.latent_dim,
            });
        }
        SegmentRules { per_modality }
    }
}

/// Why a record was rejected: `at` is the byte offset inside the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordProblem {
    pub at: u64,
    pub detail: String,
}

/// Checks a document record completely, so the accessors can trust it afterwards: the
/// structure (section 4 of docs/FORMAT.md) and the vocabulary `rules`. The scan of every
/// token id against its vocabulary runs only when `check_ids` (readers do it once per
/// document). All arithmetic on the record's fields is checked or done in u64 from u32s, so
/// any bytes give an answer, never a panic. Returns the number of sequence positions.
pub fn validate_record(record: &[u8], rules: &SegmentRules, check_ids: bool) -> Result<u64, RecordProblem> {
    let bad = |at: usize, detail: String| RecordProblem { at: at as u64, detail };
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
        // In bounds: i < n and the whole descriptor table fits (table_end <= record.len()).
        let at = RECORD_HEADER_LEN + i * SEGMENT_DESC_LEN;
        let modality = record[at];
        let Some(m) = Modality::from_u8(modality) else {
            return Err(bad(at, format!("segment {i}: unknown modality {modality}")));
        };
        let d = SegmentDesc::read(record, i);
        let Some(rule) = rules.per_modality[m.index()] else {
            return Err(bad(at, format!("segment {i}: modality {m} is not in the vocabulary")));
        };
        let (len, dim) = (d.len as u64, d.dim as u64);
        let bytes = match (d.kind, d.width) {
            (KIND_TOKENS, 1 | 2 | 4) if d.dim == 0 => {
                if d.width != rule.width {
                    return Err(bad(
                        at + 2,
                        format!(
                            "segment {i}: {m} ids stored {} bytes wide, but a vocabulary of {} ids is stored {} bytes wide",
                            d.width, rule.vocab_size, rule.width
                        ),
                    ));
                }
                len.checked_mul(d.width as u64)
            }
            (KIND_LATENT_F16, 2) if d.dim > 0 => {
                if rule.latent_dim != Some(d.dim) {
                    return Err(bad(
                        at + 8,
                        format!(
                            "segment {i}: latent rows of dim {} but the vocabulary's {m} latent_dim is {:?}",
                            d.dim, rule.latent_dim
                        ),
                    ));
                }
                len.checked_mul(dim).and_then(|e| e.checked_mul(2))
            }
            _ => return Err(bad(at, format!("segment {i}: bad kind {} / width {} / dim {}", d.kind, d.width, d.dim))),
        };
        if bytes != Some(d.payload_bytes as u64) {
            return Err(bad(
                at + 24,
                format!(
                    "segment {i}: payload of {} bytes does not hold {len} positions of kind {} / width {} / dim {}",
                    d.payload_bytes, d.kind, d.width, d.dim
                ),
            ));
        }
        let p_start = d.payload_offset as u64;
        let p_end = p_start + d.payload_bytes as u64; // two u32s: no overflow in u64
        if p_start < table_end as u64 || p_end > record.len() as u64 || !p_start.is_multiple_of(ALIGN as u64) {
            return Err(bad(
                at + 20,
                format!("segment {i}: payload {p_start}..{p_end} outside the record or misaligned"),
            ));
        }
        if d.flags & FLAG_SOURCE != 0 {
            let (s_start, s_end) = (d.source_offset as u64, d.source_offset as u64 + d.source_len as u64);
            let ok = s_start >= table_end as u64
                && s_end <= record.len() as u64
                && std::str::from_utf8(&record[s_start as usize..s_end as usize]).is_ok();
            if !ok {
                return Err(bad(at + 28, format!("segment {i}: source string {s_start}..{s_end} invalid")));
            }
        }
        if check_ids && d.kind == KIND_TOKENS {
            // In bounds: checked just above.
            let payload = &record[p_start as usize..p_end as usize];
            if let Some((j, id)) = first_id_at_or_above(payload, d.width, rule.vocab_size) {
                return Err(bad(
                    p_start as usize + j * d.width as usize,
                    format!(
                        "segment {i}: {m} id {id} at position {j} is outside the vocabulary of {} ids",
                        rule.vocab_size
                    ),
                ));
            }
        }
        positions += len; // at most 2^32 descriptors of < 2^32 positions: fits u64
    }
    Ok(positions)
}

/// The first id `>= limit` in a little-endian id payload of `width` bytes per id.
fn first_id_at_or_above(payload: &[u8], width: u8, limit: u32) -> Option<(usize, u32)> {
    // Narrow widths can hold nothing out of range when the vocabulary fills them.
    if (width == 1 && limit >= 1 << 8) || (width == 2 && limit >= 1 << 16) {
        return None;
    }
    let ids = payload.chunks_exact(width as usize).map(|c| match *c {
        [a] => a as u32,
        [a, b] => u16::from_le_bytes([a, b]) as u32,
        [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
        _ => u32::MAX,
    });
    ids.enumerate().find(|&(_, id)| id >= limit)
}

/// Largest number of bytes one zstd frame can decode to, read from its block headers
/// (RFC 8878, section 3.1.1.2): a raw or RLE block decodes to exactly its `Block_Size`, a
/// compressed block to at most 128 KiB (`Block_Maximum_Size`). `stored` must be exactly one
/// frame. A chunk table entry that claims more is lying and is rejected before a buffer of the
/// claimed size exists. Hand-written because zstd's own `ZSTD_decompressBound` trusts the
/// frame header's content size, which is the very claim being checked.
pub fn zstd_frame_bound(stored: &[u8]) -> Result<u64, String> {
    const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
    const BLOCK_MAX: u64 = 128 << 10;
    if stored.get(..4) != Some(&MAGIC[..]) {
        return Err("no zstd frame magic".into());
    }
    let Some(&fhd) = stored.get(4) else { return Err("zstd frame header truncated".into()) };
    if fhd & 0x08 != 0 {
        return Err("zstd frame header has its reserved bit set".into());
    }
    let single_segment = fhd & 0x20 != 0;
    let fcs_len = match fhd >> 6 {
        0 => usize::from(single_segment),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let dict_len = [0usize, 1, 2, 4][(fhd & 3) as usize];
    let mut at = 5 + usize::from(!single_segment) + dict_len + fcs_len;
    let mut bound = 0u64;
    loop {
        let Some(h) = at.checked_add(3).and_then(|end| stored.get(at..end)) else {
            return Err(format!("zstd block header at byte {at} past the end of the chunk"));
        };
        let h = u32::from_le_bytes([h[0], h[1], h[2], 0]);
        let (last, kind, size) = (h & 1 != 0, (h >> 1) & 3, (h >> 3) as u64);
        at += 3;
        let (stored_len, output) = match kind {
            0 => (size, size),      // raw
            1 => (1, size),         // RLE: one byte repeated
            2 => (size, BLOCK_MAX), // compressed
            _ => return Err(format!("reserved zstd block type at byte {}", at - 3)),
        };
        if size > BLOCK_MAX {
            return Err(format!("zstd block of {size} bytes at byte {} exceeds 128 KiB", at - 3));
        }
        bound += output; // at most one block per 3 input bytes: cannot overflow u64
        at = at.saturating_add(stored_len as usize);
        if last {
            break;
        }
    }
    if fhd & 0x04 != 0 {
        at = at.saturating_add(4); // content checksum
    }
    if at != stored.len() {
        return Err(format!("the zstd frame ends at byte {at} of the {}-byte chunk", stored.len()));
    }
    Ok(bound)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_bound_holds_real_frames_and_rejects_others() -> Result<(), Box<dyn std::error::Error>> {
        // Zeros compress far beyond 4096x; noise barely compresses. The bound must hold both.
        let zeros = vec![0u8; 3 << 20];
        let mut noise = vec![0u8; 300 << 10];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for (data, level) in [(&zeros[..], 3), (&zeros[..], 19), (&noise[..], 3), (&noise[..10], 1), (&zeros[..0], 3)] {
            let frame = zstd::bulk::compress(data, level)?;
            let bound = zstd_frame_bound(&frame)?;
            assert!(bound >= data.len() as u64, "bound {bound} < content {}", data.len());
            assert!(bound <= (frame.len() as u64).max(1) * 32 * 1024 + (128 << 10), "bound {bound} is loose");
        }
        let frame = zstd::bulk::compress(&zeros, 3)?;
        assert!(zeros.len() > 4096 * frame.len(), "zeros compress {}x", zeros.len() / frame.len());
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        assert!(zstd_frame_bound(&two).is_err(), "two frames");
        assert!(zstd_frame_bound(&frame[..frame.len() - 1]).is_err(), "truncated");
        assert!(zstd_frame_bound(b"not zstd").is_err());
        Ok(())
    }
}
