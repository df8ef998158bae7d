//! Generator of the hostile corpora in this folder: an independent shard writer that lays out
//! raw bytes per docs/FORMAT.md (no motley-shards code), so each corpus breaks exactly one rule
//! a reader must check while every checksum and count around it is right. Each corpus is a
//! directory `NAME/` with `manifest.json` and `NAME.mshard`; [`cases`] also says where a
//! reader must report the problem. `cargo run -p motley-shards --example make_hostile_shards`
//! rewrites the folder; `tests/hostile.rs` checks the committed bytes equal these.
#![allow(dead_code)]

use std::path::Path;

pub const TEXT: u8 = 0;
pub const IMAGE: u8 = 1;
const KIND_TOKENS: u8 = 0;
const KIND_LATENT: u8 = 1;
const ALIGN: usize = 8;

/// Where and how a reader must reject a case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Reading corpus document `doc` fails with an error naming it, the byte `offset` (a file
    /// offset; for zstd shards an offset in `in_chunk`'s uncompressed bytes) and `needle`.
    Doc { doc: u64, offset: u64, in_chunk: Option<u32>, needle: &'static str },
    /// The vocabulary is rejected: the manifest's (message holds `needle`), and the shard's
    /// meta block when the shard is opened (at byte `offset`).
    Vocab { offset: u64, needle: &'static str },
    /// Opening the shard fails at byte `offset` with `needle` in the message.
    Open { offset: u64, needle: &'static str },
}

/// One hostile corpus: its files (relative paths) and what a reader must say.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    pub shard: String,
    pub files: Vec<(String, Vec<u8>)>,
    pub expect: Expect,
}

/// One segment as written: every field explicit, so a case can lie in any of them.
#[derive(Debug, Clone)]
struct Seg {
    modality: u8,
    kind: u8,
    width: u8,
    len: u32,
    dim: u32,
    payload: Vec<u8>,
    payload_bytes: u32,
}

fn ids(modality: u8, width: u8, ids: &[u32]) -> Seg {
    let payload: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()[..width as usize].to_vec()).collect();
    Seg {
        modality,
        kind: KIND_TOKENS,
        width,
        len: ids.len() as u32,
        dim: 0,
        payload_bytes: payload.len() as u32,
        payload,
    }
}

fn latent(modality: u8, dim: u32, rows: u32) -> Seg {
    let payload: Vec<u8> = (0..rows * dim).flat_map(|_| 0x3C00u16.to_le_bytes()).collect(); // f16 1.0
    Seg { modality, kind: KIND_LATENT, width: 2, len: rows, dim, payload_bytes: payload.len() as u32, payload }
}

fn pad(v: &mut Vec<u8>) {
    v.resize(v.len().div_ceil(ALIGN) * ALIGN, 0);
}

/// A document record (section 4); returns it and each segment's payload offset.
fn record(segs: &[Seg]) -> (Vec<u8>, Vec<u32>) {
    let mut r = Vec::new();
    r.extend_from_slice(&(segs.len() as u32).to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.resize(8 + 40 * segs.len(), 0);
    let mut offsets = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        pad(&mut r);
        let at = r.len() as u32;
        offsets.push(at);
        r.extend_from_slice(&s.payload);
        let d = 8 + 40 * i;
        r[d] = s.modality;
        r[d + 1] = s.kind;
        r[d + 2] = s.width;
        r[d + 4..d + 8].copy_from_slice(&s.len.to_le_bytes());
        r[d + 8..d + 12].copy_from_slice(&s.dim.to_le_bytes());
        r[d + 20..d + 24].copy_from_slice(&at.to_le_bytes());
        r[d + 24..d + 28].copy_from_slice(&s.payload_bytes.to_le_bytes());
    }
    (r, offsets)
}

/// The vocabulary as JSON (section 6): sizes and offsets of text, image, speech, specials
/// from `specials` on, and the total.
fn vocab_json(
    text: (u32, u32),
    image: (u32, u32, Option<u32>),
    speech: (u32, u32),
    specials: u32,
    total: u32,
) -> String {
    let names = ["pad", "bos", "eos", "boi", "eoi", "bosp", "eosp"];
    let sp: Vec<String> = names.iter().enumerate().map(|(i, n)| format!("\"{n}\":{}", specials + i as u32)).collect();
    let lat = image.2.map_or("null".to_string(), |d| d.to_string());
    format!(
        "{{\"modalities\":[\
         {{\"modality\":\"text\",\"vocab_size\":{},\"latent_dim\":null,\"offset\":{},\"tokenizer\":null}},\
         {{\"modality\":\"image\",\"vocab_size\":{},\"latent_dim\":{lat},\"offset\":{},\"tokenizer\":null}},\
         {{\"modality\":\"speech\",\"vocab_size\":{},\"latent_dim\":null,\"offset\":{},\"tokenizer\":null}}],\
         \"specials\":{{{}}},\"total_size\":{total}}}",
        text.0,
        text.1,
        image.0,
        image.1,
        speech.0,
        speech.1,
        sp.join(",")
    )
}

/// Text 1000 ids (u16), image 256 codes (u8) with 4-d latents, speech 70000 units (u32).
fn standard_vocab() -> String {
    vocab_json((1000, 0), (256, 1007, Some(4)), (70_000, 1263), 1000, 71_263)
}

/// A zstd frame (RFC 8878) holding `data` in raw blocks, its header claiming `content_size`.
fn zstd_frame(data: &[u8], content_size: u64) -> Vec<u8> {
    let mut f = vec![0x28, 0xB5, 0x2F, 0xFD, 0xE0]; // magic; single segment, 8-byte content size
    f.extend_from_slice(&content_size.to_le_bytes());
    let blocks: Vec<&[u8]> = if data.is_empty() { vec![&[]] } else { data.chunks(128 << 10).collect() };
    for (i, b) in blocks.iter().enumerate() {
        let last = u32::from(i + 1 == blocks.len());
        let header = last | ((b.len() as u32) << 3); // block type 0: raw
        f.extend_from_slice(&header.to_le_bytes()[..3]);
        f.extend_from_slice(b);
    }
    f
}

/// How to build one shard. Documents go into chunks in order; `chunk_of[d]` is document
/// `d`'s chunk.
struct ShardSpec {
    zstd: bool,
    docs: Vec<Vec<Seg>>,
    chunk_of: Vec<usize>,
    vocab: String,
    /// A zstd chunk whose table entry and frame header claim this many uncompressed bytes.
    claim: Option<(usize, u32)>,
    /// Replaces a record's bytes after it was laid out (header-level lies).
    patch_record: Option<(usize, usize, Vec<u8>)>,
    /// Replaces a document's index entry (offset, len).
    index_override: Option<(usize, u32, u32)>,
    /// Added to the footer's (and manifest's) payload_bytes.
    payload_extra: u64,
}

impl ShardSpec {
    fn new(docs: Vec<Vec<Seg>>) -> Self {
        let n = docs.len();
        ShardSpec {
            zstd: false,
            docs,
            chunk_of: vec![0; n],
            vocab: standard_vocab(),
            claim: None,
            patch_record: None,
            index_override: None,
            payload_extra: 0,
        }
    }
}

/// Where things landed in a built shard.
struct Built {
    bytes: Vec<u8>,
    chunk_file_offset: Vec<u64>,
    /// Per document: (chunk, offset of its record in the uncompressed chunk, payload offsets).
    records: Vec<(usize, u64, Vec<u32>)>,
    index_offset: u64,
    table_offset: u64,
    meta_offset: u64,
    stats: [[u64; 3]; 3],
    payload_bytes: u64,
    num_chunks: u64,
}

fn crc(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

fn build(spec: &ShardSpec) -> Built {
    let mut file = vec![0u8; 64];
    file[0..8].copy_from_slice(b"MOTSHARD");
    file[8..12].copy_from_slice(&1u32.to_le_bytes());
    file[16] = u8::from(spec.zstd);
    file[20..24].copy_from_slice(&(1u32 << 20).to_le_bytes());
    let c = crc(&file[0..60]);
    file[60..64].copy_from_slice(&c.to_le_bytes());

    let num_chunks = spec.chunk_of.iter().max().map_or(0, |m| m + 1);
    let mut chunks: Vec<Vec<u8>> = vec![Vec::new(); num_chunks];
    let mut records = Vec::new();
    let mut index = Vec::new();
    let mut stats = [[0u64; 3]; 3];
    for (d, segs) in spec.docs.iter().enumerate() {
        let (mut rec, offsets) = record(segs);
        if let Some((pd, at, bytes)) = &spec.patch_record
            && *pd == d
        {
            rec[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        let chunk = &mut chunks[spec.chunk_of[d]];
        let at = chunk.len();
        chunk.extend_from_slice(&rec);
        pad(chunk);
        records.push((spec.chunk_of[d], at as u64, offsets));
        let positions: u64 = segs.iter().map(|s| s.len as u64).sum();
        let (off, len) = match spec.index_override {
            Some((od, o, l)) if od == d => (o, l),
            _ => (at as u32, rec.len() as u32),
        };
        index.extend_from_slice(&(spec.chunk_of[d] as u32).to_le_bytes());
        index.extend_from_slice(&off.to_le_bytes());
        index.extend_from_slice(&len.to_le_bytes());
        index.extend_from_slice(&(positions.min(u32::MAX as u64) as u32).to_le_bytes());
        let mut seen = [false; 3];
        for s in segs {
            let m = s.modality as usize;
            stats[m][1] += 1;
            stats[m][2] += s.len as u64;
            seen[m] = true;
        }
        for (st, seen) in stats.iter_mut().zip(seen) {
            st[0] += u64::from(seen);
        }
    }
    let mut table = Vec::new();
    let mut chunk_file_offset = Vec::new();
    let mut payload_bytes = 0u64;
    for (i, raw) in chunks.iter().enumerate() {
        pad(&mut file);
        let claimed = match spec.claim {
            Some((ci, n)) if ci == i => n,
            _ => raw.len() as u32,
        };
        let stored = if spec.zstd { zstd_frame(raw, claimed as u64) } else { raw.clone() };
        chunk_file_offset.push(file.len() as u64);
        table.extend_from_slice(&(file.len() as u64).to_le_bytes());
        table.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        table.extend_from_slice(&claimed.to_le_bytes());
        table.extend_from_slice(&crc(&stored).to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        let first_doc = spec.chunk_of.iter().position(|&c| c == i).unwrap_or(0) as u64;
        table.extend_from_slice(&first_doc.to_le_bytes());
        file.extend_from_slice(&stored);
        payload_bytes += claimed as u64;
    }
    payload_bytes += spec.payload_extra;
    pad(&mut file);
    let table_offset = file.len() as u64;
    file.extend_from_slice(&table);
    let index_offset = file.len() as u64;
    file.extend_from_slice(&index);
    let meta = format!("{{\"vocab\":{},\"writer\":\"shards/tests/hostile/generate.rs\"}}", spec.vocab);
    let meta_offset = file.len() as u64;
    file.extend_from_slice(meta.as_bytes());

    let mut footer = vec![0u8; 160];
    footer[0..8].copy_from_slice(b"MOTSFOOT");
    footer[8..12].copy_from_slice(&1u32.to_le_bytes());
    footer[12] = u8::from(spec.zstd);
    let words = [spec.docs.len() as u64, num_chunks as u64, table_offset, index_offset, meta_offset, meta.len() as u64];
    for (i, w) in words.iter().enumerate() {
        footer[16 + 8 * i..24 + 8 * i].copy_from_slice(&w.to_le_bytes());
    }
    for (m, s) in stats.iter().enumerate() {
        for (k, v) in s.iter().enumerate() {
            let at = 64 + 24 * m + 8 * k;
            footer[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    footer[136..144].copy_from_slice(&payload_bytes.to_le_bytes());
    let mut index_crc_input = table.clone();
    index_crc_input.extend_from_slice(&index);
    footer[144..148].copy_from_slice(&crc(&index_crc_input).to_le_bytes());
    footer[148..152].copy_from_slice(&crc(meta.as_bytes()).to_le_bytes());
    let c = crc(&footer[0..152]);
    footer[152..156].copy_from_slice(&c.to_le_bytes());
    footer[156..160].copy_from_slice(b"MSE1");
    file.extend_from_slice(&footer);
    Built {
        bytes: file,
        chunk_file_offset,
        records,
        index_offset,
        table_offset,
        meta_offset,
        stats,
        payload_bytes,
        num_chunks: num_chunks as u64,
    }
}

fn manifest(shard: &str, b: &Built, vocab: &str, zstd: bool, num_docs: u64) -> Vec<u8> {
    let stats = |s: &[u64; 3]| format!("{{\"docs\":{},\"segments\":{},\"tokens\":{}}}", s[0], s[1], s[2]);
    let modalities = format!(
        "{{\"text\":{},\"image\":{},\"speech\":{}}}",
        stats(&b.stats[0]),
        stats(&b.stats[1]),
        stats(&b.stats[2])
    );
    let json = format!(
        "{{\"format\":\"motley-shards\",\"version\":1,\"vocab\":{vocab},\"num_docs\":{num_docs},\"bytes\":{bytes},\
         \"totals\":{modalities},\"shards\":[{{\"name\":\"{shard}\",\"bytes\":{bytes},\"blake3\":\"{hash}\",\
         \"num_docs\":{num_docs},\"num_chunks\":{chunks},\"compression\":\"{comp}\",\"payload_bytes\":{payload},\
         \"modalities\":{modalities}}}],\"tokenizers\":{{}},\
         \"extra\":{{\"generator\":\"shards/tests/hostile/generate.rs\"}}}}\n",
        bytes = b.bytes.len(),
        hash = blake3::hash(&b.bytes).to_hex(),
        chunks = b.num_chunks,
        comp = if zstd { "zstd" } else { "raw" },
        payload = b.payload_bytes,
    );
    json.into_bytes()
}

/// Three small valid documents around a hostile one in position 1.
fn around(hostile: Vec<Seg>) -> Vec<Vec<Seg>> {
    vec![vec![ids(TEXT, 2, &[1, 2, 3])], hostile, vec![ids(TEXT, 2, &[4]), ids(IMAGE, 1, &[0, 255])]]
}

fn case(name: &'static str, spec: ShardSpec, expect: impl FnOnce(&Built) -> Expect) -> Case {
    let shard = format!("{name}.mshard");
    let b = build(&spec);
    let files = vec![
        (format!("{name}/manifest.json"), manifest(&shard, &b, &spec.vocab, spec.zstd, spec.docs.len() as u64)),
        (format!("{name}/{shard}"), b.bytes.clone()),
    ];
    Case { name, shard, expect: expect(&b), files }
}

/// File offset of document `d`'s first segment descriptor field at `field` (raw shards).
fn desc_field(b: &Built, d: usize, seg: usize, field: u64) -> u64 {
    let (chunk, at, _) = &b.records[d];
    b.chunk_file_offset[*chunk] + at + 8 + 40 * seg as u64 + field
}

/// Every hostile corpus, in a fixed order.
pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // An id equal to the text vocabulary size (1000), stored at the right width.
    v.push(case("oov-id", ShardSpec::new(around(vec![ids(TEXT, 2, &[5, 1000, 7])])), |b| {
        let (chunk, at, payload) = &b.records[1];
        Expect::Doc {
            doc: 1,
            offset: b.chunk_file_offset[*chunk] + at + payload[0] as u64 + 2,
            in_chunk: None,
            needle: "outside the vocabulary of 1000 ids",
        }
    }));
    // The same in a zstd shard: the offset is inside the uncompressed chunk.
    let mut spec = ShardSpec::new(around(vec![ids(TEXT, 2, &[5, 1000, 7])]));
    spec.zstd = true;
    v.push(case("oov-id-zstd", spec, |b| {
        let (_, at, payload) = &b.records[1];
        Expect::Doc { doc: 1, offset: at + payload[0] as u64 + 2, in_chunk: Some(0), needle: "outside the vocabulary" }
    }));
    // Text ids in range, but stored as u32 where a vocabulary of 1000 takes u16.
    v.push(case("wide-ids", ShardSpec::new(around(vec![ids(TEXT, 4, &[5, 6])])), |b| Expect::Doc {
        doc: 1,
        offset: desc_field(b, 1, 0, 2),
        in_chunk: None,
        needle: "4 bytes wide",
    }));
    // Latent rows of dim 3 where the vocabulary's image latent_dim is 4.
    v.push(case("latent-dim", ShardSpec::new(around(vec![latent(IMAGE, 3, 2)])), |b| Expect::Doc {
        doc: 1,
        offset: desc_field(b, 1, 0, 8),
        in_chunk: None,
        needle: "latent_dim",
    }));
    // len = dim = 0xFFFFFFFF under a vocabulary whose latent_dim is that too: len·dim·2
    // overflows 64 bits (this panicked debug builds of verify and head).
    let mut huge = latent(IMAGE, 1, 4);
    (huge.len, huge.dim) = (u32::MAX, u32::MAX);
    let mut spec = ShardSpec::new(around(vec![huge]));
    spec.vocab = vocab_json((1000, 0), (256, 1007, Some(u32::MAX)), (70_000, 1263), 1000, 71_263);
    v.push(case("latent-overflow", spec, |b| Expect::Doc {
        doc: 1,
        offset: desc_field(b, 1, 0, 24),
        in_chunk: None,
        needle: "does not hold",
    }));
    // A record header claiming 2^32 - 1 segment descriptors.
    let mut spec = ShardSpec::new(around(vec![ids(TEXT, 2, &[9])]));
    spec.patch_record = Some((1, 0, u32::MAX.to_le_bytes().to_vec()));
    v.push(case("segment-count", spec, |b| {
        let (chunk, at, _) = &b.records[1];
        Expect::Doc { doc: 1, offset: b.chunk_file_offset[*chunk] + at, in_chunk: None, needle: "do not fit" }
    }));
    // An index entry whose record would end past 2^32.
    let mut spec = ShardSpec::new(around(vec![ids(TEXT, 2, &[9])]));
    spec.index_override = Some((1, 0xFFFF_FFF8, u32::MAX));
    v.push(case("index-overflow", spec, |b| Expect::Doc {
        doc: 1,
        offset: b.index_offset + 16,
        in_chunk: None,
        needle: "outside chunk",
    }));
    // The image block overlaps the text block.
    let mut spec = ShardSpec::new(around(vec![ids(TEXT, 2, &[9])]));
    spec.vocab = vocab_json((1000, 0), (256, 990, Some(4)), (70_000, 1263), 1000, 71_263);
    v.push(case("vocab-overlap", spec, |b| Expect::Vocab { offset: b.meta_offset, needle: "overlaps" }));
    // The image block runs past 2^32 (global ids would wrap).
    let mut spec = ShardSpec::new(around(vec![ids(IMAGE, 1, &[200])]));
    spec.vocab = vocab_json((1000, 0), (256, u32::MAX - 100, Some(4)), (70_000, 1263), 1000, u32::MAX);
    v.push(case("vocab-overflow", spec, |b| Expect::Vocab { offset: b.meta_offset, needle: "overflows" }));
    // A zstd chunk (document 1's) claiming 1 MiB from a frame of one ~100-byte raw block; the
    // table, the frame header and payload_bytes all agree on the lie.
    let mut spec = ShardSpec::new(around(vec![ids(TEXT, 2, &[9, 8, 7])]));
    spec.zstd = true;
    spec.chunk_of = vec![0, 1, 2];
    spec.claim = Some((1, 1 << 20));
    v.push(case("zstd-claim", spec, |b| Expect::Doc {
        doc: 1,
        offset: b.chunk_file_offset[1],
        in_chunk: None,
        needle: "decodes to at most",
    }));
    // Uncompressed chunk sizes that do not add up to the footer's payload_bytes.
    let mut spec = ShardSpec::new(around(vec![ids(TEXT, 2, &[9])]));
    spec.payload_extra = 8;
    v.push(case("payload-sum", spec, |b| Expect::Open { offset: b.table_offset, needle: "add up to" }));
    v
}

/// Writes every case under `root` (one directory per case).
pub fn write_all(root: &Path) -> std::io::Result<()> {
    for c in cases() {
        for (rel, bytes) in &c.files {
            let p = root.join(rel);
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(p, bytes)?;
        }
    }
    Ok(())
}
