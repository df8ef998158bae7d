//! The global row index (Megatron's sample index, per loader source): where each packed row of
//! an epoch starts — (position in the epoch's document order, flattened-token offset in that
//! document). Built once per (corpus, source slot, seed, epoch, seq_len, split, shuffle) by one
//! walk of the packer, written atomically beside the corpus or in the cache directory and
//! memory-mapped by every rank, so rank r packs only its own rows: its cost per batch no longer
//! grows with the world size. The file layout is in docs/FORMAT.md ("Row index files").

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, ShardError};

/// When the loader uses a row index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowIndexMode {
    /// With more than one rank (one rank packs every row anyway).
    #[default]
    Auto,
    Always,
    /// Every rank walks every other rank's rows in skip mode (the baseline of the bench).
    Never,
}

pub const MAGIC: [u8; 8] = *b"MOTROWIX";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 128;
pub const ENTRY_LEN: usize = 16;

/// A source cursor at a row start: epoch, position in that epoch's order, token offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RowStart {
    pub epoch: u64,
    pub position: u64,
    pub offset: u64,
}

/// Header of one epoch's file (rows whose start cursor is in `epoch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochHeader {
    pub key: [u8; 32],
    pub epoch: u64,
    /// Source-local number of the first row in this file.
    pub first_row: u64,
    pub num_rows: u64,
    /// The first row's start (where the previous epoch's walk stopped).
    pub start: RowStart,
    /// The start of the row after the last one: the first row of the next non-empty file.
    pub end: RowStart,
}

impl EpochHeader {
    fn encode(&self, entries_crc: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..48].copy_from_slice(&self.key);
        let words = [
            self.epoch,
            self.first_row,
            self.num_rows,
            self.start.position,
            self.start.offset,
            self.end.epoch,
            self.end.position,
            self.end.offset,
        ];
        for (i, w) in words.iter().enumerate() {
            h[48 + 8 * i..56 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        h[112..116].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32c::crc32c(&h[..124]);
        h[124..128].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn decode(path: &Path, b: &[u8]) -> Result<(EpochHeader, u32)> {
        let bad = |at: u64, d: String| ShardError::corrupt(path, "row index header", at, d);
        let h = b.get(..HEADER_LEN).ok_or_else(|| bad(0, format!("file of {} bytes", b.len())))?;
        if h[0..8] != MAGIC {
            return Err(bad(0, "bad magic".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(x)
        };
        if u32_at(8) != VERSION {
            return Err(ShardError::Version { path: path.to_path_buf(), found: u32_at(8), supported: VERSION });
        }
        let crc = crc32c::crc32c(&h[..124]);
        if crc != u32_at(124) {
            return Err(crate::format::checksum(path, "row index header", 124, u32_at(124), crc));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&h[16..48]);
        let hd = EpochHeader {
            key,
            epoch: u64_at(48),
            first_row: u64_at(56),
            num_rows: u64_at(64),
            start: RowStart { epoch: u64_at(48), position: u64_at(72), offset: u64_at(80) },
            end: RowStart { epoch: u64_at(88), position: u64_at(96), offset: u64_at(104) },
        };
        Ok((hd, u32_at(112)))
    }
}

/// One epoch's row starts, memory-mapped.
#[derive(Debug)]
pub struct EpochIndex {
    pub header: EpochHeader,
    map: memmap2::Mmap,
}

impl EpochIndex {
    /// Start of source-local row `row` (`first_row <= row < first_row + num_rows`).
    pub fn get(&self, row: u64) -> Option<RowStart> {
        let i = row.checked_sub(self.header.first_row).filter(|&i| i < self.header.num_rows)? as usize;
        let at = HEADER_LEN + i * ENTRY_LEN;
        let e = self.map.get(at..at + ENTRY_LEN)?;
        let word = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&e[o..o + 8]);
            u64::from_le_bytes(x)
        };
        Some(RowStart { epoch: self.header.epoch, position: word(0), offset: word(8) })
    }

    pub fn contains(&self, row: u64) -> bool {
        row >= self.header.first_row && row - self.header.first_row < self.header.num_rows
    }

    /// Bytes of the file.
    pub fn len_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    /// Maps and checks `path` against the expected key and chain position; None when absent.
    fn open(path: &Path, key: &[u8; 32], epoch: u64, first_row: u64, start: RowStart) -> Result<Option<EpochIndex>> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ShardError::io(path, "open", e)),
        };
        // SAFETY: index files are written to a temporary name and renamed into place, never
        // modified afterwards; the map is read-only.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ShardError::io(path, "mmap", e))?;
        let (header, entries_crc) = EpochHeader::decode(path, &map)?;
        let want_len = (header.num_rows as u128) * ENTRY_LEN as u128 + HEADER_LEN as u128;
        if want_len != map.len() as u128 {
            return Err(ShardError::Truncated {
                path: path.to_path_buf(),
                what: "row index",
                offset: HEADER_LEN as u64,
                end: want_len.min(u64::MAX as u128) as u64,
                len: map.len() as u64,
            });
        }
        let crc = crc32c::crc32c(&map[HEADER_LEN..]);
        if crc != entries_crc {
            return Err(crate::format::checksum(path, "row index entries", HEADER_LEN as u64, entries_crc, crc));
        }
        if &header.key != key || header.epoch != epoch || header.first_row != first_row || header.start != start {
            return Err(ShardError::corrupt(
                path,
                "row index header",
                16,
                format!(
                    "belongs to another corpus or configuration (epoch {}, first row {}, start {:?}; expected {epoch}, {first_row}, {start:?})",
                    header.epoch, header.first_row, header.start
                ),
            ));
        }
        Ok(Some(EpochIndex { header, map }))
    }
}

/// Every epoch index of one loader source, loaded in row order as the loader reaches them.
#[derive(Debug)]
pub struct SourceIndex {
    dir: PathBuf,
    key: [u8; 32],
    pub epochs: Vec<EpochIndex>,
}

/// What the caller must do to extend a [`SourceIndex`].
#[derive(Debug)]
pub enum Next {
    /// The epoch index was read from disk (or built by another process meanwhile).
    Loaded,
    /// Nobody has built it: walk the packer from `start`, then call [`SourceIndex::store`]
    /// with the returned guard (it holds the build lock).
    Build { epoch: u64, first_row: u64, start: RowStart, lock: BuildLock },
}

/// The exclusive lock on one epoch file's build (released when dropped).
#[derive(Debug)]
pub struct BuildLock {
    _file: std::fs::File,
}

impl SourceIndex {
    /// `key` identifies (corpus, source slot, seed, seq_len, split, shuffle); see the loader.
    pub fn new(dir: PathBuf, key: [u8; 32]) -> SourceIndex {
        SourceIndex { dir, key, epochs: Vec::new() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn hex(&self) -> String {
        self.key[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn path(&self, epoch: u64) -> PathBuf {
        self.dir.join(format!("rows-{}-e{epoch}.idx", self.hex()))
    }

    /// The start of row `row`, when a loaded epoch holds it.
    pub fn find(&self, row: u64) -> Option<RowStart> {
        // Rows move forward: the last epochs are the likely ones.
        self.epochs.iter().rev().find(|e| e.contains(row)).and_then(|e| e.get(row))
    }

    /// Rows covered by the loaded epochs.
    pub fn rows_covered(&self) -> u64 {
        self.epochs.last().map_or(0, |e| e.header.first_row + e.header.num_rows)
    }

    /// Loads the next epoch file from disk, or hands out the build lock for it.
    pub fn load_next(&mut self) -> Result<Next> {
        let (epoch, first_row, start) = match self.epochs.last() {
            Some(e) => (e.header.end.epoch, e.header.first_row + e.header.num_rows, e.header.end),
            None => (0, 0, RowStart::default()),
        };
        let path = self.path(epoch);
        // Usually another rank (or an earlier run) built it: no lock needed to read it.
        if let Ok(Some(ix)) = EpochIndex::open(&path, &self.key, epoch, first_row, start) {
            self.epochs.push(ix);
            return Ok(Next::Loaded);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| ShardError::io(&self.dir, "create dir", e))?;
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| ShardError::io(&lock_path, "create", e))?;
        // Ranks sharing the directory wait here while the first one builds.
        lock.lock().map_err(|e| ShardError::io(&lock_path, "lock", e))?;
        match EpochIndex::open(&path, &self.key, epoch, first_row, start) {
            Ok(Some(ix)) => {
                self.epochs.push(ix);
                return Ok(Next::Loaded);
            }
            Ok(None) => {}
            // A cache file: a damaged or foreign one is rebuilt, not trusted.
            Err(e) => tracing::warn!("rebuilding row index: {e}"),
        }
        Ok(Next::Build { epoch, first_row, start, lock: BuildLock { _file: lock } })
    }

    /// Writes an epoch built by the caller (atomically: temporary file, fsync, rename) and maps it.
    pub fn store(&mut self, header: EpochHeader, entries: &[[u64; 2]], lock: BuildLock) -> Result<()> {
        let path = self.path(header.epoch);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut body = Vec::with_capacity(entries.len() * ENTRY_LEN);
        for e in entries {
            body.extend_from_slice(&e[0].to_le_bytes());
            body.extend_from_slice(&e[1].to_le_bytes());
        }
        let head = EpochHeader { key: self.key, num_rows: entries.len() as u64, ..header };
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&head.encode(crc32c::crc32c(&body)))?;
            f.write_all(&body)?;
            f.sync_all()
        };
        write().map_err(|e| ShardError::io(&tmp, "write", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ShardError::io(&path, "rename", e))?;
        crate::writer::sync_dir(&path);
        let ix = EpochIndex::open(&path, &self.key, head.epoch, head.first_row, head.start)?
            .ok_or_else(|| ShardError::MissingShard { path: path.clone() })?;
        drop(lock);
        self.epochs.push(ix);
        Ok(())
    }
}

/// Where row indexes go when the corpus directory is not writable: `$MOTLEY_CACHE/row-index`,
/// else `$XDG_CACHE_HOME/motley/row-index`, else `~/.cache/motley/row-index`.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("MOTLEY_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("motley")))
        .or_else(|| var("HOME").map(|p| p.join(".cache/motley")))
        .unwrap_or_else(std::env::temp_dir)
        .join("row-index")
}

/// Default index directory of a corpus: `<corpus>/.motley-index` when it can be written,
/// else [`cache_dir`].
pub fn default_dir(corpus_dir: &Path) -> PathBuf {
    let beside = corpus_dir.join(".motley-index");
    let probe = beside.join(format!(".probe-{}", std::process::id()));
    let ok = std::fs::create_dir_all(&beside).is_ok() && std::fs::File::create(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    if ok { beside } else { cache_dir() }
}
