//! The decoded-chunk cache of zstd shards: one least-recently-used cache per corpus, bounded in
//! bytes, shared by all its shards, so a shuffle window's chunks stay decoded while the loader
//! reads their documents in random order (one chunk per shard was the previous design: every
//! shuffled document read decoded a whole chunk).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Default byte limit of a corpus's cache: four default shuffle windows of decoded payload,
/// so a window and its neighbours' boundary chunks fit with room for uneven document sizes.
pub const DEFAULT_CHUNK_CACHE_BYTES: u64 = 4 * crate::order::DEFAULT_WINDOW_BYTES;

/// An uncompressed chunk (zstd shards), 8-aligned so typed slices can borrow from it.
#[derive(Debug)]
pub(crate) struct ChunkBuf {
    pub(crate) words: Vec<u64>,
    pub(crate) len: usize,
}

impl ChunkBuf {
    pub(crate) fn bytes(&self) -> &[u8] {
        let b: &[u8] = bytemuck::cast_slice(&self.words);
        &b[..self.len]
    }
}

#[derive(Debug)]
struct Inner {
    lru: lru::LruCache<(u64, u64), Arc<ChunkBuf>>,
    bytes: u64,
    /// Evicted buffers nobody borrows any more, reused for the next decodes: a fresh 1 MiB
    /// buffer costs 256 page faults and an munmap, as much as decoding into it.
    spare: Vec<Vec<u64>>,
}

/// Evicted buffers kept for reuse.
const SPARE_BUFFERS: usize = 4;

/// Decoded chunks keyed by (shard reader id, chunk index), evicted least recently used first
/// once their bytes pass the limit; the newest chunk is always kept, so a limit of 0 keeps one.
#[derive(Debug)]
pub struct ChunkCache {
    limit: AtomicU64,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A process-unique id for a shard reader's cache keys.
pub(crate) fn next_reader_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl ChunkCache {
    pub fn new(limit_bytes: u64) -> ChunkCache {
        ChunkCache {
            limit: AtomicU64::new(limit_bytes),
            inner: Mutex::new(Inner { lru: lru::LruCache::unbounded(), bytes: 0, spare: Vec::new() }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes the byte limit (takes effect at the next insertion).
    pub fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// Decoded bytes held now.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().map(|g| g.bytes).unwrap_or(0)
    }

    /// (hits, misses) since creation.
    pub fn counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    pub(crate) fn get(&self, key: (u64, u64)) -> Option<Arc<ChunkBuf>> {
        let hit = self.inner.lock().ok().and_then(|mut g| g.lru.get(&key).cloned());
        let counter = if hit.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// Whether `key` is cached (without counting a hit or refreshing it).
    pub(crate) fn contains(&self, key: (u64, u64)) -> bool {
        self.inner.lock().is_ok_and(|g| g.lru.contains(&key))
    }

    pub(crate) fn insert(&self, key: (u64, u64), buf: Arc<ChunkBuf>) {
        let Ok(mut g) = self.inner.lock() else { return };
        let add = buf.words.len() as u64 * 8;
        if let Some(old) = g.lru.put(key, buf) {
            g.bytes -= old.words.len() as u64 * 8;
        }
        g.bytes += add;
        let limit = self.limit();
        while g.bytes > limit && g.lru.len() > 1 {
            match g.lru.pop_lru() {
                Some((_, old)) => {
                    g.bytes -= old.words.len() as u64 * 8;
                    if g.spare.len() < SPARE_BUFFERS
                        && let Ok(b) = Arc::try_unwrap(old)
                    {
                        g.spare.push(b.words);
                    }
                }
                None => break,
            }
        }
    }

    /// A buffer of `words` u64s for a decode: a spare one when there is one (its contents are
    /// overwritten by the decoder; bytes past the chunk's length are never read), else a new one.
    pub(crate) fn buffer(&self, words: usize) -> Vec<u64> {
        let spare = self.inner.lock().ok().and_then(|mut g| g.spare.pop());
        match spare {
            Some(mut v) => {
                v.resize(words, 0);
                v
            }
            None => vec![0u64; words],
        }
    }

    /// Drops every chunk of one reader (a shard evicted from a remote cache, a dropped reader).
    pub(crate) fn forget(&self, reader: u64) {
        let Ok(mut g) = self.inner.lock() else { return };
        let keys: Vec<(u64, u64)> = g.lru.iter().filter(|(k, _)| k.0 == reader).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some(old) = g.lru.pop(&k) {
                g.bytes -= old.words.len() as u64 * 8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(words: usize) -> Arc<ChunkBuf> {
        Arc::new(ChunkBuf { words: vec![0; words], len: words * 8 })
    }

    #[test]
    fn evicts_least_recently_used_past_the_limit() {
        let c = ChunkCache::new(3 * 8 * 10);
        for i in 0..3 {
            c.insert((0, i), buf(10));
        }
        assert!(c.get((0, 0)).is_some()); // 0 is now the most recent
        c.insert((0, 3), buf(10));
        assert!(c.get((0, 1)).is_none(), "1 was least recently used");
        assert!(c.get((0, 0)).is_some() && c.get((0, 2)).is_some() && c.get((0, 3)).is_some());
        assert_eq!(c.bytes(), 240);
        c.forget(0);
        assert_eq!(c.bytes(), 0);
        let one = ChunkCache::new(0);
        one.insert((1, 0), buf(4));
        one.insert((1, 1), buf(4));
        assert!(one.get((1, 1)).is_some() && one.get((1, 0)).is_none());
    }
}
