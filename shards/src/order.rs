//! The document order of one loader epoch: a global document shuffle, or the block shuffle
//! that respects compression (shards permuted, then documents shuffled inside windows of
//! consecutive documents), both O(1) memory per document and O(1) or O(log shards) per position.
//!
//! The block shuffle is Mosaic Streaming's py1b idea: a window of `window` consecutive
//! documents of the permuted shard sequence spans a few chunks, so a bounded decoded-chunk cache
//! decodes each zstd chunk about once per epoch instead of once per document.

use std::cell::Cell;

use serde::{Deserialize, Serialize};

use crate::perm::{Permutation, mix64};
use crate::reader::Corpus;

/// How the loader shuffles documents within an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shuffle {
    /// Shards in a seeded order, documents shuffled inside windows of consecutive documents
    /// (`shuffle_window`): chunk-local reads, so zstd shards decode each chunk about once.
    #[default]
    Block,
    /// One seeded permutation of all documents (every document equally likely anywhere; with
    /// zstd every document read decodes its chunk).
    Documents,
}

impl Shuffle {
    pub fn as_str(self) -> &'static str {
        match self {
            Shuffle::Block => "block",
            Shuffle::Documents => "documents",
        }
    }
}

/// Decoded payload per window when `shuffle_window` is 0 (auto).
pub const DEFAULT_WINDOW_BYTES: u64 = 64 << 20;

/// Documents per window for `corpus`: `window` when set, else as many average documents as fit
/// in [`DEFAULT_WINDOW_BYTES`] of decoded payload (manifest averages, no shard touched).
pub fn resolve_window(corpus: &Corpus, window: u64) -> u64 {
    let n = corpus.num_docs().max(1);
    if window > 0 {
        return window.min(n);
    }
    let payload: u64 = corpus.manifest().shards.iter().fold(0u64, |a, s| a.saturating_add(s.payload_bytes));
    let avg = (payload / n).max(1);
    (DEFAULT_WINDOW_BYTES / avg).clamp(1, n)
}

/// A document order over `0..num_docs` for one (source, epoch).
#[derive(Debug, Clone)]
pub enum DocOrder {
    Documents(Permutation),
    Block(BlockOrder),
}

impl DocOrder {
    pub fn new(corpus: &Corpus, shuffle: Shuffle, window: u64, seed: u64) -> DocOrder {
        match shuffle {
            Shuffle::Documents => DocOrder::Documents(Permutation::new(corpus.num_docs(), seed)),
            Shuffle::Block => DocOrder::Block(BlockOrder::new(corpus, resolve_window(corpus, window), seed)),
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            DocOrder::Documents(p) => p.len(),
            DocOrder::Block(b) => b.n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Global document id at position `i` of the order (`i < len`).
    pub fn get(&self, i: u64) -> u64 {
        match self {
            DocOrder::Documents(p) => p.get(i),
            DocOrder::Block(b) => b.get(i),
        }
    }
}

/// Shards permuted, then documents permuted inside consecutive windows.
#[derive(Debug, Clone)]
pub struct BlockOrder {
    n: u64,
    window: u64,
    seed: u64,
    /// Position of the k-th shard of the permuted sequence (non-empty shards only).
    starts: Vec<u64>,
    /// Global id of that shard's first document.
    first: Vec<u64>,
    /// Its manifest index.
    ids: Vec<usize>,
    /// The last window's permutation: consecutive positions mostly share a window.
    last: Cell<Option<(u64, Permutation)>>,
}

impl BlockOrder {
    fn new(corpus: &Corpus, window: u64, seed: u64) -> BlockOrder {
        let shards = corpus.manifest().shards.len();
        let perm = Permutation::new(shards as u64, mix64(seed ^ 0x5348_4152_4453));
        let (mut starts, mut first, mut ids) =
            (Vec::with_capacity(shards), Vec::with_capacity(shards), Vec::with_capacity(shards));
        let mut at = 0u64;
        for k in 0..shards as u64 {
            let s = perm.get(k) as usize;
            let docs = corpus.manifest().shards[s].num_docs;
            if docs > 0 {
                starts.push(at);
                first.push(corpus.shard_start(s).unwrap_or(0));
                ids.push(s);
                at += docs;
            }
        }
        BlockOrder { n: at, window: window.max(1), seed, starts, first, ids, last: Cell::new(None) }
    }

    /// Documents per window.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Manifest indexes of the (non-empty) shards in the order this epoch reads them.
    pub fn shard_order(&self) -> &[usize] {
        &self.ids
    }

    /// The documents of window `w` as (manifest shard index, shard-local range) in storage
    /// order: what a decode-ahead thread decodes while the loader reads window `w - 1`.
    pub fn window_ranges(&self, w: u64) -> Vec<(usize, std::ops::Range<u64>)> {
        let base = w.saturating_mul(self.window);
        let end = base.saturating_add(self.window).min(self.n);
        let mut out = Vec::new();
        if base >= end {
            return out;
        }
        let mut k = self.starts.partition_point(|&s| s <= base).saturating_sub(1);
        while k < self.starts.len() && self.starts[k] < end {
            let (s, e) = (self.starts[k], self.starts.get(k + 1).copied().unwrap_or(self.n));
            out.push((self.ids[k], base.max(s) - s..end.min(e) - s));
            k += 1;
        }
        out
    }

    /// How many shards of [`BlockOrder::shard_order`] lie wholly before position `p`'s window:
    /// no later position of this epoch reads them.
    pub fn shards_done_before(&self, p: u64) -> usize {
        let base = (p / self.window) * self.window;
        // Shard k ends where shard k + 1 starts (the last one at n).
        (0..self.starts.len()).find(|&k| self.starts.get(k + 1).copied().unwrap_or(self.n) > base).unwrap_or(0)
    }

    fn get(&self, p: u64) -> u64 {
        if p >= self.n {
            return p;
        }
        let w = p / self.window;
        let base = w * self.window;
        let perm = match self.last.get() {
            Some((lw, perm)) if lw == w => perm,
            _ => {
                let size = self.window.min(self.n - base);
                let perm = Permutation::new(size, mix64(self.seed ^ mix64(w.wrapping_add(0x57_494E))));
                self.last.set(Some((w, perm)));
                perm
            }
        };
        let q = base + perm.get(p - base);
        let k = self.starts.partition_point(|&s| s <= q).saturating_sub(1);
        self.first[k] + (q - self.starts[k])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Document, Modality, Segment, Vocab};
    use crate::writer::{CorpusWriter, WriterProperties};

    fn corpus(dir: &std::path::Path, docs: u64, shard_bytes: u64) -> Corpus {
        let vocab = Vocab::build(100, 0, 0, None);
        let props = WriterProperties::builder().max_shard_bytes(shard_bytes).build();
        let mut w = CorpusWriter::create(dir, &vocab, props, "t").expect("writer");
        for i in 0..docs {
            w.add_document(&Document::new(vec![Segment::tokens(Modality::Text, vec![(i % 100) as u32])])).expect("add");
        }
        w.finish_with_manifest().expect("finish");
        Corpus::open(dir).expect("open")
    }

    #[test]
    fn block_order_is_a_permutation_with_local_windows() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = corpus(dir.path(), 1000, 4096);
        assert!(c.num_shards() > 4, "{} shards", c.num_shards());
        let min_docs = c.manifest().shards.iter().map(|s| s.num_docs).min().unwrap_or(1).max(1);
        for window in [1u64, 7, 64, 100, 1000] {
            let o = DocOrder::new(&c, Shuffle::Block, window, 42);
            let order: Vec<u64> = (0..o.len()).map(|i| o.get(i)).collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..1000).collect::<Vec<_>>(), "window {window}");
            if window == 100 {
                // A window of 100 positions holds consecutive documents of a few shards only.
                for w in order.chunks(100) {
                    let shards: std::collections::BTreeSet<usize> =
                        w.iter().map(|&d| c.locate(d).map(|x| x.0).unwrap_or(usize::MAX)).collect();
                    assert!(shards.len() as u64 <= 100 / min_docs + 2, "{shards:?}");
                }
                assert_ne!(order, (0..1000).collect::<Vec<_>>());
            }
        }
        let a: Vec<u64> = {
            let o = DocOrder::new(&c, Shuffle::Block, 100, 1);
            (0..1000).map(|i| o.get(i)).collect()
        };
        let b: Vec<u64> = {
            let o = DocOrder::new(&c, Shuffle::Block, 100, 2);
            (0..1000).map(|i| o.get(i)).collect()
        };
        assert_ne!(a, b);
    }
}
