//! The streaming loader that feeds the trainer: deterministic shuffled packing of documents
//! into fixed-shape [`Batch`]es, weighted mixing of corpora, exact and elastic resume, and a
//! background prefetch thread.
//!
//! Global order: every rank walks the same global stream of packed sequences (rows), fixed by
//! `(seed, sources, seq_len, split_segments, split)` and independent of world size. A global
//! step takes `batch_size × world_size` consecutive rows; the k-th row of a step goes to rank
//! `k mod world_size`, batch slot `k div world_size`. With one rank the packer walks the stream
//! itself; with several, each rank looks up where its rows start in the row index (see
//! `rowindex.rs`, built once per epoch and shared) and packs only those, so its cost does not
//! grow with the world size (`RowIndexMode::Never` keeps the old skip mode, where every rank
//! walked every row). The state counts rows consumed, so resuming with another world size or
//! batch size continues the same stream: no row is lost or repeated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use serde::{Deserialize, Serialize};

use crate::batch::{Batch, DocSpan, Latents};
use crate::error::{Result, ShardError};
use crate::order::{DocOrder, Shuffle, resolve_window};
use crate::perm::mix64;
use crate::reader::{Corpus, DocumentRef, SegmentView, is_eval_doc};
use crate::rowindex::{EpochHeader, Next, RowIndexMode, RowStart, SourceIndex};
use crate::types::{Modality, Vocab};

/// Which documents the loader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Documents not held out (all of them when `eval_fraction` is 0).
    #[default]
    Train,
    /// The held-out documents: a fixed hash of the document id below `eval_fraction`.
    Eval,
}

/// Loader configuration. `Default` gives a single-process loader; see [`LoaderConfig::from_env`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Positions per row (inputs and targets are both `seq_len` long).
    pub seq_len: usize,
    /// Rows per batch on this rank.
    pub batch_size: usize,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    /// Local rank (GPU index on the node); informational for the trainer.
    pub local_rank: usize,
    /// Allow cutting an image or speech segment across rows even when it would fit in one
    /// (false: move it whole to the next row, padding the rest of the current one).
    pub split_segments: bool,
    /// Batches prepared ahead by the background thread; 0 packs on the caller's thread.
    pub prefetch: usize,
    pub split: Split,
    /// Fraction of documents held out for evaluation (0 disables the split).
    pub eval_fraction: f64,
    /// Document order within an epoch (docs/FORMAT.md, section 7).
    #[serde(default)]
    pub shuffle: Shuffle,
    /// Documents per block-shuffle window; 0 = as many as hold 64 MiB of decoded payload.
    #[serde(default)]
    pub shuffle_window: u64,
    /// Whether each rank packs only its own rows through the row index.
    #[serde(default)]
    pub row_index: RowIndexMode,
    /// Where row indexes live (None: beside each corpus, else the cache directory).
    #[serde(default)]
    pub index_dir: Option<PathBuf>,
    /// zstd shards under the block shuffle: a helper thread decodes the next window's chunks
    /// while the packer reads the current one.
    #[serde(default = "yes")]
    pub decode_ahead: bool,
}

fn yes() -> bool {
    true
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            seq_len: 1024,
            batch_size: 8,
            seed: 0,
            rank: 0,
            world_size: 1,
            local_rank: 0,
            split_segments: false,
            prefetch: 4,
            split: Split::Train,
            eval_fraction: 0.0,
            shuffle: Shuffle::Block,
            shuffle_window: 0,
            row_index: RowIndexMode::Auto,
            index_dir: None,
            decode_ahead: true,
        }
    }
}

impl LoaderConfig {
    /// `base` with `rank`, `world_size` and `local_rank` taken from the torchrun variables
    /// `RANK`, `WORLD_SIZE`, `LOCAL_RANK` where they are set.
    pub fn from_env(base: LoaderConfig) -> Result<LoaderConfig> {
        Self::from_vars(base, |name| std::env::var(name).ok())
    }

    /// [`LoaderConfig::from_env`] over any variable lookup (testable without touching the
    /// process environment).
    pub fn from_vars(base: LoaderConfig, var: impl Fn(&str) -> Option<String>) -> Result<LoaderConfig> {
        let mut cfg = base;
        let get = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| ShardError::Config(format!("{name}={v:?} is not a non-negative integer"))),
                None => Ok(None),
            }
        };
        if let Some(r) = get("RANK")? {
            cfg.rank = r;
        }
        if let Some(w) = get("WORLD_SIZE")? {
            cfg.world_size = w;
        }
        if let Some(l) = get("LOCAL_RANK")? {
            cfg.local_rank = l;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.seq_len < 1 || self.batch_size < 1 {
            return Err(ShardError::Config(format!(
                "seq_len {} and batch_size {} must be at least 1",
                self.seq_len, self.batch_size
            )));
        }
        if self.seq_len > u32::MAX as usize / 2 {
            return Err(ShardError::Config(format!("seq_len {} too large", self.seq_len)));
        }
        if self.world_size < 1 || self.rank >= self.world_size {
            return Err(ShardError::Config(format!("rank {} must be below world_size {}", self.rank, self.world_size)));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(ShardError::Config(format!("eval_fraction {} must be in [0, 1)", self.eval_fraction)));
        }
        if self.split == Split::Eval && self.eval_fraction <= 0.0 {
            return Err(ShardError::Config("split = eval needs eval_fraction > 0".into()));
        }
        Ok(())
    }
}

/// One corpus in the mixture and its sampling weight.
#[derive(Debug, Clone)]
pub struct Source {
    pub corpus: Arc<Corpus>,
    pub weight: f64,
}

impl Source {
    pub fn new(corpus: Arc<Corpus>, weight: f64) -> Source {
        Source { corpus, weight }
    }
    /// Opens the corpus in `dir`.
    pub fn open(dir: impl AsRef<Path>, weight: f64) -> Result<Source> {
        Ok(Source { corpus: Arc::new(Corpus::open(dir)?), weight })
    }
}

/// Where one source's document stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCursor {
    /// Documents in the corpus (resume refuses a different corpus).
    pub num_docs: u64,
    /// This source's epoch (each source cycles on its own).
    pub epoch: u64,
    /// Position in this epoch's shuffled order of the current document.
    pub position: u64,
    /// Flattened-token offset inside the current document already consumed.
    pub offset: u64,
    /// Rows this source has produced in total.
    pub rows: u64,
}

/// The loader's resumable state as of the batches already returned to the caller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderState {
    pub version: u32,
    pub seed: u64,
    pub seq_len: usize,
    pub split_segments: bool,
    pub split: Split,
    pub eval_fraction: f64,
    /// States saved before the block shuffle existed walked the global document shuffle.
    #[serde(default = "legacy_shuffle")]
    pub shuffle: Shuffle,
    #[serde(default)]
    pub shuffle_window: u64,
    /// Epoch of the first source.
    pub epoch: u64,
    /// Global steps taken (each `batch_size × world_size` rows, at the sizes then in force).
    pub step: u64,
    /// Global rows (packed sequences) consumed by all ranks together.
    pub rows: u64,
    pub sources: Vec<SourceCursor>,
}

const STATE_VERSION: u32 = 1;

fn legacy_shuffle() -> Shuffle {
    Shuffle::Documents
}

/// Global ids of the structural specials and the per-modality blocks.
#[derive(Debug, Clone)]
struct Ids {
    pad: u32,
    bos: u32,
    eos: u32,
    open: [Option<u32>; 3],
    close: [Option<u32>; 3],
    offset: [u32; 3],
    latent_dim: usize,
}

impl Ids {
    fn new(v: &Vocab) -> Result<Ids> {
        let sp = |n: &str| v.special(n).ok_or_else(|| ShardError::Config(format!("vocabulary has no special {n:?}")));
        let mut offset = [0u32; 3];
        let mut latent_dim = None;
        for m in Modality::ALL {
            if let Some(mv) = v.modality(m) {
                offset[m.index()] = mv.offset;
                if let Some(d) = mv.latent_dim {
                    if latent_dim.is_some_and(|x| x != d) {
                        return Err(ShardError::Config("modalities with different latent dims".into()));
                    }
                    latent_dim = Some(d);
                }
            }
        }
        Ok(Ids {
            pad: sp("pad")?,
            bos: sp("bos")?,
            eos: sp("eos")?,
            open: [None, Some(sp("boi")?), Some(sp("bosp")?)],
            close: [None, Some(sp("eoi")?), Some(sp("eosp")?)],
            offset,
            latent_dim: latent_dim.unwrap_or(0) as usize,
        })
    }
}

/// One run of the flattened document.
#[derive(Debug, Clone, Copy)]
enum Piece {
    Special(u32),
    Tokens { seg: usize, offset: u32 },
    Latent { seg: usize, placeholder: u32 },
}

#[derive(Debug, Clone, Copy)]
struct PlanItem {
    piece: Piece,
    modality: u8,
    start: usize,
    len: usize,
    /// Segment group inside the document: BOS, each segment with its markers, EOS.
    group: u32,
}

#[derive(Debug)]
struct SourceRt {
    corpus: Arc<Corpus>,
    weight: f64,
    /// The document order of epoch `order_epoch`.
    order: DocOrder,
    order_epoch: u64,
    /// The row index, when this loader packs only its own rows.
    index: Option<SourceIndex>,
    /// Remote corpora: the window last seen and how many of this epoch's shards were released.
    window_seen: Option<u64>,
    released: usize,
    /// The decode-ahead thread's queue (zstd corpora under the block shuffle).
    ahead: Option<crossbeam_channel::Sender<DecodeJob>>,
}

/// Chunks to decode ahead: (corpus, [(manifest shard index, shard-local documents)]).
type DecodeJob = (Arc<Corpus>, Vec<(usize, std::ops::Range<u64>)>);

/// The decode-ahead thread; it ends when every sender (the packer's sources) is gone.
fn spawn_decode_ahead() -> Option<crossbeam_channel::Sender<DecodeJob>> {
    // Two windows queued at most: a loader that outruns the thread never waits for it.
    let (tx, rx) = crossbeam_channel::bounded::<DecodeJob>(2);
    std::thread::Builder::new()
        .name("motley-decode-ahead".into())
        .spawn(move || {
            for (corpus, ranges) in rx {
                for (shard, docs) in ranges {
                    if let Ok(r) = corpus.shard(shard) {
                        r.warm(docs);
                    }
                }
            }
        })
        .ok()?;
    Some(tx)
}

impl SourceRt {
    fn set_order(&mut self, order: DocOrder, epoch: u64) {
        self.order = order;
        self.order_epoch = epoch;
        self.window_seen = None;
        self.released = 0;
    }

    /// For a corpus whose shards come from a store: on entering a new window, lets go of the
    /// shards this epoch has finished and tells the store which come next.
    fn track(&mut self, position: u64) {
        let store = self.corpus.has_store();
        if !store && self.ahead.is_none() {
            return;
        }
        let DocOrder::Block(b) = &self.order else {
            if store && self.window_seen.is_none() {
                self.window_seen = Some(0);
                self.corpus.hint(&(0..self.corpus.num_shards()).collect::<Vec<_>>());
            }
            return;
        };
        let w = position / b.window();
        if self.window_seen == Some(w) {
            return;
        }
        self.window_seen = Some(w);
        if let Some(tx) = &self.ahead {
            let _ = tx.try_send((self.corpus.clone(), b.window_ranges(w + 1)));
        }
        if !store {
            return;
        }
        let done = b.shards_done_before(position);
        for &s in b.shard_order().get(self.released..done).unwrap_or(&[]) {
            self.corpus.release(s);
        }
        self.released = self.released.max(done);
        self.corpus.hint(b.shard_order().get(done..).unwrap_or(&[]));
    }
}

/// The single-threaded packer; the loader runs it inline or on the prefetch thread.
#[derive(Debug)]
struct Packer {
    cfg: LoaderConfig,
    ids: Ids,
    sources: Vec<SourceRt>,
    state: LoaderState,
    plan: Vec<PlanItem>,
    units: Vec<(usize, usize)>,
}

fn perm_seed(seed: u64, source: usize, epoch: u64) -> u64 {
    mix64(seed ^ mix64(source as u64 + 0x51) ^ mix64(epoch.wrapping_add(0xE90C)))
}

fn order_for(cfg: &LoaderConfig, corpus: &Corpus, src: usize, epoch: u64) -> DocOrder {
    DocOrder::new(corpus, cfg.shuffle, cfg.shuffle_window, perm_seed(cfg.seed, src, epoch))
}

/// What a source's row stream depends on: the corpus (its manifest, hence every shard's
/// blake3), the source's slot in the mixture (it keys the shuffle), the seed, the packing and
/// the split. A row index built under another key is never used.
fn index_key(cfg: &LoaderConfig, src: usize, corpus: &Corpus) -> [u8; 32] {
    let manifest = serde_json::to_vec(corpus.manifest()).unwrap_or_default();
    let key = serde_json::json!({
        "row_index": crate::rowindex::VERSION,
        "manifest": blake3::hash(&manifest).to_hex().to_string(),
        "source": src,
        "seed": cfg.seed,
        "seq_len": cfg.seq_len,
        "split_segments": cfg.split_segments,
        "split": cfg.split,
        "eval_fraction": cfg.eval_fraction,
        "shuffle": cfg.shuffle,
        "window": resolve_window(corpus, cfg.shuffle_window),
    });
    *blake3::hash(key.to_string().as_bytes()).as_bytes()
}

fn empty_batch(b: usize, t: usize, latent_dim: usize) -> Batch {
    let n = b * t;
    Batch {
        batch_size: b,
        seq_len: t,
        inputs: Vec::with_capacity(n),
        targets: Vec::with_capacity(n),
        modality: Vec::with_capacity(n),
        target_modality: Vec::with_capacity(n),
        positions: Vec::with_capacity(n),
        doc_ids: Vec::with_capacity(n),
        segment_ids: Vec::with_capacity(n),
        loss_mask: Vec::with_capacity(n),
        latents: Latents { dim: latent_dim, data: Vec::new(), positions: Vec::new() },
        padding_fraction: 0.0,
        row_ids: vec![0; b],
        spans: Vec::new(),
    }
}

impl Packer {
    fn new(sources: Vec<Source>, cfg: LoaderConfig, state: Option<LoaderState>) -> Result<Packer> {
        cfg.validate()?;
        let first = sources.first().ok_or_else(|| ShardError::Config("no sources".into()))?;
        let vocab = first.corpus.vocab().clone();
        let total_w: f64 = sources.iter().map(|s| s.weight).sum();
        for (i, s) in sources.iter().enumerate() {
            if s.corpus.vocab() != &vocab {
                return Err(ShardError::Config(format!(
                    "source {i} ({}) has a different vocabulary",
                    s.corpus.dir().display()
                )));
            }
            if !(s.weight.is_finite() && s.weight > 0.0) {
                return Err(ShardError::Config(format!("source {i} weight {} must be positive", s.weight)));
            }
        }
        let state = match state {
            Some(st) => {
                check_resume(&st, &cfg, &sources)?;
                st
            }
            None => LoaderState {
                version: STATE_VERSION,
                seed: cfg.seed,
                seq_len: cfg.seq_len,
                split_segments: cfg.split_segments,
                split: cfg.split,
                eval_fraction: cfg.eval_fraction,
                shuffle: cfg.shuffle,
                shuffle_window: cfg.shuffle_window,
                epoch: 0,
                step: 0,
                rows: 0,
                sources: sources
                    .iter()
                    .map(|s| SourceCursor { num_docs: s.corpus.num_docs(), epoch: 0, position: 0, offset: 0, rows: 0 })
                    .collect(),
            },
        };
        let use_index = match cfg.row_index {
            RowIndexMode::Always => true,
            RowIndexMode::Never => false,
            RowIndexMode::Auto => cfg.world_size > 1,
        };
        let zstd = |s: &Source| s.corpus.manifest().shards.iter().any(|e| e.compression == crate::Compression::Zstd);
        let ahead = (cfg.decode_ahead && cfg.shuffle == Shuffle::Block && sources.iter().any(zstd))
            .then(spawn_decode_ahead)
            .flatten();
        let rts: Vec<SourceRt> = sources
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let epoch = state.sources[i].epoch;
                let index = use_index.then(|| {
                    let dir = cfg.index_dir.clone().unwrap_or_else(|| crate::rowindex::default_dir(s.corpus.dir()));
                    SourceIndex::new(dir, index_key(&cfg, i, &s.corpus))
                });
                SourceRt {
                    order: DocOrder::new(&s.corpus, cfg.shuffle, cfg.shuffle_window, perm_seed(cfg.seed, i, epoch)),
                    order_epoch: epoch,
                    weight: s.weight / total_w,
                    corpus: s.corpus,
                    index,
                    window_seen: None,
                    released: 0,
                    ahead: ahead.clone(),
                }
            })
            .collect();
        for (i, s) in rts.iter().enumerate() {
            let any = (0..s.corpus.num_docs()).any(|d| in_split(&cfg, d));
            if !any {
                return Err(ShardError::Config(format!(
                    "source {i} ({}) has no documents in the {:?} split",
                    s.corpus.dir().display(),
                    cfg.split
                )));
            }
        }
        Ok(Packer { ids: Ids::new(&vocab)?, cfg, sources: rts, state, plan: Vec::new(), units: Vec::new() })
    }

    /// Source of the next row: the one lagging furthest behind its weight (Megatron blending).
    fn pick_source(&self) -> usize {
        let next = (self.state.rows + 1) as f64;
        let mut best = 0;
        let mut best_lag = f64::NEG_INFINITY;
        for (i, s) in self.sources.iter().enumerate() {
            let lag = s.weight * next - self.state.sources[i].rows as f64;
            if lag > best_lag {
                best = i;
                best_lag = lag;
            }
        }
        best
    }

    /// Global document id the source's cursor points at, skipping documents of the other split
    /// and rolling the source's epoch over when its order is exhausted.
    fn current_doc(&mut self, src: usize) -> Result<u64> {
        let mut wraps = 0;
        loop {
            let cur = &mut self.state.sources[src];
            let rt = &mut self.sources[src];
            if rt.order_epoch != cur.epoch {
                rt.set_order(order_for(&self.cfg, &rt.corpus, src, cur.epoch), cur.epoch);
            }
            if cur.position >= rt.order.len() {
                cur.epoch += 1;
                cur.position = 0;
                cur.offset = 0;
                rt.set_order(order_for(&self.cfg, &rt.corpus, src, cur.epoch), cur.epoch);
                wraps += 1;
                if wraps > 1 {
                    return Err(ShardError::Config(format!("source {src} has no documents in the split")));
                }
                continue;
            }
            let doc = rt.order.get(cur.position);
            rt.track(cur.position);
            if in_split(&self.cfg, doc) {
                return Ok(doc);
            }
            cur.position += 1;
        }
    }

    /// Lays out the flattened document: BOS, per segment (markers +) payload, EOS.
    fn build_plan(&mut self, doc: &DocumentRef<'_>) -> usize {
        fn push(plan: &mut Vec<PlanItem>, at: &mut usize, piece: Piece, modality: u8, len: usize, group: u32) {
            plan.push(PlanItem { piece, modality, start: *at, len, group });
            *at += len;
        }
        let plan = &mut self.plan;
        plan.clear();
        self.units.clear();
        let mut at = 0usize;
        push(plan, &mut at, Piece::Special(self.ids.bos), 0, 1, 0);
        for (i, s) in doc.segments().enumerate() {
            let m = s.modality().index();
            let group = i as u32 + 1;
            let unit_start = at;
            if let Some(open) = self.ids.open[m] {
                push(plan, &mut at, Piece::Special(open), 0, 1, group);
            }
            let piece = if s.is_latent() {
                Piece::Latent { seg: i, placeholder: self.ids.offset[m] }
            } else {
                Piece::Tokens { seg: i, offset: self.ids.offset[m] }
            };
            push(plan, &mut at, piece, m as u8, s.len(), group);
            if let Some(close) = self.ids.close[m] {
                push(plan, &mut at, Piece::Special(close), 0, 1, group);
                self.units.push((unit_start, at - unit_start));
            }
        }
        let eos_group = doc.num_segments() as u32 + 1;
        push(plan, &mut at, Piece::Special(self.ids.eos), 0, 1, eos_group);
        at
    }

    /// Appends flattened positions `[a, b)` of the planned document to batch slot `slot`,
    /// starting at row position `p`: row position `q < seq_len` is input `q`, and row
    /// position `q >= 1` is target `q - 1` (a row holds `seq_len + 1` positions). Rows and
    /// pieces arrive in order, so every field is built by appending (no zero-fill pass).
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        doc: &DocumentRef<'_>,
        a: usize,
        b: usize,
        p: usize,
        doc_idx: u32,
        seg_ctr: &mut u32,
        slot: usize,
        batch: &mut Batch,
    ) {
        let t = self.cfg.seq_len;
        let base = slot * t;
        let mut last_group = None;
        for item in &self.plan {
            let s = a.max(item.start);
            let e = b.min(item.start + item.len);
            if s >= e {
                continue;
            }
            if last_group != Some(item.group) {
                if last_group.is_some() {
                    *seg_ctr += 1;
                }
                last_group = Some(item.group);
            }
            let (q0, n) = (p + (s - a), e - s);
            let within = s - item.start;
            // Inputs: row positions q0..min(q0 + n, t).
            let n_in = (q0 + n).min(t).saturating_sub(q0);
            // Targets: row positions max(q0, 1)..q0 + n.
            let skip = usize::from(q0 == 0);
            let n_tgt = n - skip;
            match item.piece {
                Piece::Special(id) => {
                    batch.inputs.extend(std::iter::repeat_n(id, n_in));
                    batch.targets.extend(std::iter::repeat_n(id, n_tgt));
                }
                Piece::Tokens { seg, offset } => {
                    let ids = doc.segment(seg).and_then(|sg| sg.ids()).filter(|ids| within + n <= ids.len());
                    match ids {
                        Some(ids) => {
                            ids.extend_offset(within, n_in, offset, &mut batch.inputs);
                            ids.extend_offset(within + skip, n_tgt, offset, &mut batch.targets);
                        }
                        None => {
                            batch.inputs.extend(std::iter::repeat_n(offset, n_in));
                            batch.targets.extend(std::iter::repeat_n(offset, n_tgt));
                        }
                    }
                }
                Piece::Latent { seg, placeholder } => {
                    batch.inputs.extend(std::iter::repeat_n(placeholder, n_in));
                    batch.targets.extend(std::iter::repeat_n(placeholder, n_tgt));
                    if let Some(SegmentView::Latent { dim, data }) = doc.segment(seg).map(|sg| sg.data()) {
                        let dim = dim as usize;
                        for j in 0..n_in {
                            let r = within + j;
                            if let Some(v) = data.get(r * dim..(r + 1) * dim) {
                                batch.latents.data.extend_from_slice(v);
                                batch.latents.positions.push((base + q0 + j) as u32);
                            }
                        }
                    }
                }
            }
            let loss = u8::from(!matches!(item.piece, Piece::Latent { .. }));
            batch.modality.extend(std::iter::repeat_n(item.modality, n_in));
            batch.doc_ids.extend(std::iter::repeat_n(doc_idx, n_in));
            batch.segment_ids.extend(std::iter::repeat_n(*seg_ctr, n_in));
            let first = (s - a) as u32;
            batch.positions.extend(first..first + n_in as u32);
            batch.target_modality.extend(std::iter::repeat_n(item.modality, n_tgt));
            batch.loss_mask.extend(std::iter::repeat_n(loss, n_tgt));
        }
        // The document's first placed token is no target of the previous document.
        if let Some(m) = p.checked_sub(1).and_then(|q| batch.loss_mask.get_mut(base + q)) {
            *m = 0;
        }
        *seg_ctr += 1;
    }

    /// Packs the next row of source `src`; writes it into batch slot `slot` when given.
    /// Returns the number of padding inputs written.
    fn pack_row(&mut self, src: usize, slot: Option<usize>, batch: &mut Batch) -> Result<usize> {
        let l = self.cfg.seq_len + 1;
        let t = self.cfg.seq_len;
        let corpus = self.sources[src].corpus.clone();
        let mut p = 0usize;
        let mut doc_idx = 0u32;
        let mut seg_ctr = 0u32;
        while p < l {
            let doc_id = self.current_doc(src)?;
            let doc = corpus.get(doc_id)?;
            let flat = self.build_plan(&doc);
            let o = self.state.sources[src].offset as usize;
            let o = o.min(flat.saturating_sub(1));
            let (rem, space) = (flat - o, l - p);
            if rem <= space {
                if let Some(slot) = slot {
                    self.fill(&doc, o, flat, p, doc_idx, &mut seg_ctr, slot, batch);
                    batch.spans.push(DocSpan {
                        row: slot as u32,
                        source: src as u32,
                        doc: doc_id,
                        start: o as u32,
                        end: flat as u32,
                        at: p as u32,
                    });
                }
                p += rem;
                doc_idx += 1;
                let cur = &mut self.state.sources[src];
                cur.position += 1;
                cur.offset = 0;
                continue;
            }
            let mut c = o + space;
            if !self.cfg.split_segments
                && let Some(&(u, len)) = self.units.iter().find(|&&(u, len)| u < c && c < u + len)
                && len <= t
                && (p > 0 || u > o + 1)
            {
                c = u;
            }
            if p > 0 && c <= 1 {
                break; // nothing worth placing: the document starts the next row
            }
            if let Some(slot) = slot {
                self.fill(&doc, o, c, p, doc_idx, &mut seg_ctr, slot, batch);
                batch.spans.push(DocSpan {
                    row: slot as u32,
                    source: src as u32,
                    doc: doc_id,
                    start: o as u32,
                    end: c as u32,
                    at: p as u32,
                });
            }
            p += c - o;
            doc_idx += 1;
            // The last placed token is only a target here; it is the next row's first input.
            self.state.sources[src].offset = (c - 1) as u64;
            break;
        }
        let mut pads = 0;
        if let (Some(_), true) = (slot, p < l) {
            let n_in = t.saturating_sub(p);
            pads = n_in;
            batch.inputs.extend(std::iter::repeat_n(self.ids.pad, n_in));
            batch.modality.extend(std::iter::repeat_n(0, n_in));
            batch.doc_ids.extend(std::iter::repeat_n(doc_idx, n_in));
            batch.segment_ids.extend(std::iter::repeat_n(seg_ctr, n_in));
            batch.positions.extend(0..n_in as u32);
            let n_tgt = l - p.max(1);
            batch.targets.extend(std::iter::repeat_n(self.ids.pad, n_tgt));
            batch.target_modality.extend(std::iter::repeat_n(0, n_tgt));
            batch.loss_mask.extend(std::iter::repeat_n(0, n_tgt));
        }
        Ok(pads)
    }

    /// Packs one global step and returns this rank's batch.
    fn next_batch(&mut self) -> Result<Batch> {
        let (b, t, w, r) = (self.cfg.batch_size, self.cfg.seq_len, self.cfg.world_size, self.cfg.rank);
        let n = b * t;
        let mut batch = empty_batch(b, t, self.ids.latent_dim);
        let mut pads = 0usize;
        if self.sources[0].index.is_some() {
            pads = self.pack_own_rows(&mut batch)?;
        } else {
            for k in 0..b * w {
                let src = self.pick_source();
                let slot = (k % w == r).then_some(k / w);
                pads += self.pack_row(src, slot, &mut batch)?;
                if let Some(slot) = slot {
                    batch.row_ids[slot] = self.state.rows;
                }
                self.state.sources[src].rows += 1;
                self.state.rows += 1;
            }
        }
        let lens = [
            batch.inputs.len(),
            batch.targets.len(),
            batch.modality.len(),
            batch.target_modality.len(),
            batch.positions.len(),
            batch.doc_ids.len(),
            batch.segment_ids.len(),
            batch.loss_mask.len(),
        ];
        if lens.iter().any(|&x| x != n) {
            return Err(ShardError::Config(format!("internal: packed field lengths {lens:?}, expected {n}")));
        }
        self.state.step += 1;
        self.state.epoch = self.state.sources.first().map_or(0, |s| s.epoch);
        batch.padding_fraction = pads as f32 / n as f32;
        Ok(batch)
    }
}

impl Packer {
    /// Row-index mode: decides which (source, source-local row) each of this rank's slots
    /// gets, packs just those rows from their indexed starts, and leaves every source's cursor
    /// where the sequential packer would (the start of its next row), so states agree.
    fn pack_own_rows(&mut self, batch: &mut Batch) -> Result<usize> {
        let (b, w, r) = (self.cfg.batch_size, self.cfg.world_size, self.cfg.rank);
        let first = self.state.rows;
        // (slot, source, source-local row)
        let mut own = Vec::with_capacity(b);
        if self.sources.len() == 1 {
            let base = self.state.sources[0].rows;
            own.extend((0..b).map(|slot| (slot, 0usize, base + (slot * w + r) as u64)));
            self.state.sources[0].rows += (b * w) as u64;
            self.state.rows += (b * w) as u64;
        } else {
            // The blend only counts rows: a few float operations per global row and source.
            for k in 0..b * w {
                let src = self.pick_source();
                if k % w == r {
                    own.push((k / w, src, self.state.sources[src].rows));
                }
                self.state.sources[src].rows += 1;
                self.state.rows += 1;
            }
        }
        let mut pads = 0;
        for (slot, src, row) in own {
            let start = self.row_start(src, row)?;
            self.seek(src, start);
            pads += self.pack_row(src, Some(slot), batch)?;
            batch.row_ids[slot] = first + (slot * w + r) as u64;
        }
        for src in 0..self.sources.len() {
            let start = self.row_start(src, self.state.sources[src].rows)?;
            self.seek(src, start);
        }
        Ok(pads)
    }

    fn seek(&mut self, src: usize, at: RowStart) {
        let cur = &mut self.state.sources[src];
        (cur.epoch, cur.position, cur.offset) = (at.epoch, at.position, at.offset);
        let rt = &mut self.sources[src];
        if rt.order_epoch != at.epoch {
            rt.set_order(order_for(&self.cfg, &rt.corpus, src, at.epoch), at.epoch);
        }
    }

    /// Where source-local row `row` of source `src` starts, loading or building epoch indexes
    /// until one holds it.
    fn row_start(&mut self, src: usize, row: u64) -> Result<RowStart> {
        loop {
            let Some(ix) = self.sources[src].index.as_mut() else {
                return Err(ShardError::Config("internal: no row index".into()));
            };
            if let Some(at) = ix.find(row) {
                return Ok(at);
            }
            if let Next::Build { epoch, first_row, start, lock } = ix.load_next()? {
                let t0 = std::time::Instant::now();
                let (entries, end) = self.walk_epoch(src, start)?;
                let header = EpochHeader { key: [0; 32], epoch, first_row, num_rows: entries.len() as u64, start, end };
                let Some(ix) = self.sources[src].index.as_mut() else { continue };
                ix.store(header, &entries, lock)?;
                tracing::info!(
                    "row index of source {src}, epoch {epoch}: {} rows in {:.2} s ({})",
                    entries.len(),
                    t0.elapsed().as_secs_f64(),
                    ix.path(epoch).display()
                );
            }
        }
    }

    /// Packs (without writing anything) every row whose start cursor lies in `start.epoch`,
    /// recording each start; returns them and the start of the next row. The source's cursor
    /// and order are restored afterwards.
    fn walk_epoch(&mut self, src: usize, start: RowStart) -> Result<(Vec<[u64; 2]>, RowStart)> {
        let saved = self.state.sources[src];
        self.seek(src, start);
        let mut dummy = empty_batch(0, self.cfg.seq_len, 0);
        let mut entries = Vec::new();
        let result = loop {
            let c = self.state.sources[src];
            if c.epoch != start.epoch {
                break Ok(RowStart { epoch: c.epoch, position: c.position, offset: c.offset });
            }
            entries.push([c.position, c.offset]);
            if let Err(e) = self.pack_row(src, None, &mut dummy) {
                break Err(e);
            }
        };
        let back = RowStart { epoch: saved.epoch, position: saved.position, offset: saved.offset };
        self.seek(src, back);
        self.state.sources[src] = saved;
        result.map(|end| (entries, end))
    }
}

fn in_split(cfg: &LoaderConfig, doc: u64) -> bool {
    match cfg.split {
        Split::Train => !is_eval_doc(doc, cfg.eval_fraction),
        Split::Eval => is_eval_doc(doc, cfg.eval_fraction),
    }
}

fn check_resume(st: &LoaderState, cfg: &LoaderConfig, sources: &[Source]) -> Result<()> {
    let bad = |what: String| Err(ShardError::Resume(what));
    if st.version != STATE_VERSION {
        return bad(format!("state version {} (this build writes {STATE_VERSION})", st.version));
    }
    if st.seed != cfg.seed || st.seq_len != cfg.seq_len || st.split_segments != cfg.split_segments {
        return bad(format!(
            "state was saved with seed {} seq_len {} split_segments {}, config has {} {} {}",
            st.seed, st.seq_len, st.split_segments, cfg.seed, cfg.seq_len, cfg.split_segments
        ));
    }
    if st.split != cfg.split || st.eval_fraction != cfg.eval_fraction {
        return bad("split or eval_fraction differ from the saved state".into());
    }
    if st.shuffle != cfg.shuffle || (st.shuffle == Shuffle::Block && st.shuffle_window != cfg.shuffle_window) {
        return bad(format!(
            "state was saved with shuffle {} (window {}), config has {} (window {}); set the data config's shuffle to match",
            st.shuffle.as_str(),
            st.shuffle_window,
            cfg.shuffle.as_str(),
            cfg.shuffle_window
        ));
    }
    if st.sources.len() != sources.len() {
        return bad(format!("state has {} sources, {} given", st.sources.len(), sources.len()));
    }
    // Counters the loader increments: an edited 2^64-1 would overflow on the next batch. 2^53
    // (exact in every JSON reader) is far past any run.
    const MAX_COUNT: u64 = 1 << 53;
    let mut counters = vec![("step".to_string(), st.step), ("rows".into(), st.rows), ("epoch".into(), st.epoch)];
    for (i, c) in st.sources.iter().enumerate() {
        counters.extend([(format!("sources[{i}].epoch"), c.epoch), (format!("sources[{i}].rows"), c.rows)]);
    }
    if let Some((name, v)) = counters.into_iter().find(|&(_, v)| v > MAX_COUNT) {
        return bad(format!("state's {name} is {v}, past 2^53: not a state a run wrote"));
    }
    // What every batch keeps true; an edit that breaks it would resume somewhere else (or, in
    // row-index mode, index epochs up to a row no run reached).
    let source_rows: u64 = st.sources.iter().map(|c| c.rows).sum();
    if source_rows != st.rows {
        return bad(format!("state's sources hold {source_rows} rows in all, its rows counter says {}", st.rows));
    }
    if st.sources.first().is_some_and(|c| c.epoch != st.epoch) {
        return bad(format!("state's epoch {} is not its first source's epoch {}", st.epoch, st.sources[0].epoch));
    }
    for (i, (c, s)) in st.sources.iter().zip(sources).enumerate() {
        if c.num_docs != s.corpus.num_docs() {
            return bad(format!(
                "source {i} had {} documents, {} now has {}",
                c.num_docs,
                s.corpus.dir().display(),
                s.corpus.num_docs()
            ));
        }
    }
    Ok(())
}

type Produced = Result<(Batch, LoaderState)>;

#[derive(Debug)]
enum Engine {
    Inline(Box<Packer>),
    Prefetch { rx: Option<crossbeam_channel::Receiver<Produced>>, handle: Option<std::thread::JoinHandle<()>> },
}

/// Streaming loader: `next_batch()` returns this rank's next fixed-shape batch.
#[derive(Debug)]
pub struct Loader {
    vocab: Vocab,
    cfg: LoaderConfig,
    state: LoaderState,
    engine: Engine,
}

impl Loader {
    pub fn new(sources: Vec<Source>, cfg: LoaderConfig) -> Result<Loader> {
        Self::start(sources, cfg, None)
    }

    /// A loader over the single corpus in `dir`.
    pub fn from_dir(dir: impl AsRef<Path>, cfg: LoaderConfig) -> Result<Loader> {
        Self::new(vec![Source::open(dir, 1.0)?], cfg)
    }

    /// Continues exactly after the batches counted in `state` (world size and batch size may
    /// differ from the run that saved it; seed, seq_len, split and sources may not).
    pub fn resume(sources: Vec<Source>, cfg: LoaderConfig, state: LoaderState) -> Result<Loader> {
        Self::start(sources, cfg, Some(state))
    }

    fn start(sources: Vec<Source>, cfg: LoaderConfig, state: Option<LoaderState>) -> Result<Loader> {
        let packer = Packer::new(sources, cfg.clone(), state)?;
        let vocab = packer.sources[0].corpus.vocab().clone();
        let state = packer.state.clone();
        let engine = if cfg.prefetch == 0 {
            Engine::Inline(Box::new(packer))
        } else {
            let (tx, rx) = crossbeam_channel::bounded::<Produced>(cfg.prefetch);
            let mut packer = packer;
            let handle = std::thread::Builder::new()
                .name(format!("motley-loader-{}", cfg.rank))
                .spawn(move || {
                    loop {
                        let r = packer.next_batch().map(|b| (b, packer.state.clone()));
                        let failed = r.is_err();
                        // The receiver is gone when the loader was dropped: stop quietly.
                        if tx.send(r).is_err() || failed {
                            break;
                        }
                    }
                })
                .map_err(|e| ShardError::Config(format!("cannot spawn the prefetch thread: {e}")))?;
            Engine::Prefetch { rx: Some(rx), handle: Some(handle) }
        };
        Ok(Loader { vocab, cfg, state, engine })
    }

    /// This rank's next batch. Epochs roll over by themselves.
    pub fn next_batch(&mut self) -> Result<Batch> {
        match &mut self.engine {
            Engine::Inline(p) => {
                let b = p.next_batch()?;
                self.state = p.state.clone();
                Ok(b)
            }
            Engine::Prefetch { rx, .. } => {
                let rx = rx.as_ref().ok_or_else(|| ShardError::Config("loader closed".into()))?;
                match rx.recv() {
                    Ok(Ok((b, st))) => {
                        self.state = st;
                        Ok(b)
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(ShardError::Config("the prefetch thread stopped after an earlier error".into())),
                }
            }
        }
    }

    /// State after the batches returned so far (not counting prefetched ones).
    pub fn state(&self) -> LoaderState {
        self.state.clone()
    }

    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Epoch of the first source as of the batches returned so far.
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if let Engine::Prefetch { rx, handle } = &mut self.engine {
            drop(rx.take()); // unblocks the thread's send
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// Copies latent rows out (used by tests and tools).
pub fn latent_rows(l: &Latents) -> impl Iterator<Item = (u32, &[f16])> {
    l.positions.iter().copied().zip(l.data.chunks(l.dim.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchrun_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let cfg = LoaderConfig::from_vars(
            LoaderConfig::default(),
            vars(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")]),
        );
        let cfg = cfg.map_err(|e| e.to_string());
        assert_eq!(cfg.as_ref().map(|c| (c.rank, c.world_size, c.local_rank)), Ok((3, 4, 1)));
        let unset = LoaderConfig::from_vars(LoaderConfig { rank: 1, world_size: 2, ..Default::default() }, vars(&[]));
        assert_eq!(unset.map(|c| (c.rank, c.world_size)).ok(), Some((1, 2)));
        assert!(LoaderConfig::from_vars(LoaderConfig::default(), vars(&[("RANK", "4"), ("WORLD_SIZE", "4")])).is_err());
        assert!(LoaderConfig::from_vars(LoaderConfig::default(), vars(&[("RANK", "x")])).is_err());
    }
}
