//! The fixed-shape training batch the loader hands to the trainer (no libtorch types here).
//!
//! All per-token arrays are row-major `[batch, seq_len]`. Inputs and targets are already
//! shifted (nanoGPT style): `targets[b, t]` is the token that follows `inputs[b, t]`.

use half::f16;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// Global token ids of the inputs. Positions holding a latent patch carry the image
    /// block's first id as a placeholder (the trainer replaces them by projected latents).
    pub inputs: Vec<u32>,
    /// Global token ids to predict at each position.
    pub targets: Vec<u32>,
    /// Modality of each input token (routes it to that modality's tower). Specials are text.
    pub modality: Vec<u8>,
    /// Modality of each target token (per-modality loss reporting).
    pub target_modality: Vec<u8>,
    /// Position of each token inside its document (restarts at 0 at document starts, and at
    /// the start of a row that continues a document cut in an earlier row).
    pub positions: Vec<u32>,
    /// Document index within the row (0, 1, 2, ...): attention never crosses a change.
    /// Trailing padding gets the next index.
    pub doc_ids: Vec<u32>,
    /// Segment index within the row: same value = same segment (bidirectional image attention).
    /// BOS and EOS are segments of their own; BOI/EOI and BOSP/EOSP belong to their segment.
    pub segment_ids: Vec<u32>,
    /// 1 where the target counts towards the next-token loss: 0 on padding, across document
    /// boundaries and where the target is a latent patch (its loss is the diffusion loss).
    pub loss_mask: Vec<u8>,
    /// Continuous segments present in the batch (Transfusion setting); empty otherwise.
    pub latents: Latents,
    /// Fraction of the batch's positions that are padding.
    pub padding_fraction: f32,
    /// Index of each row in the loader's global row stream (the same on every rank and
    /// world size: provenance for logging, resume checks and tests).
    #[serde(default)]
    pub row_ids: Vec<u64>,
    /// The document pieces each row holds, in row order (which documents a batch trained on).
    #[serde(default)]
    pub spans: Vec<DocSpan>,
}

/// One piece of a document placed in a row: flattened positions `start..end` of document
/// `doc` of source `source` occupy row positions `at..at + (end - start)` (position `seq_len`
/// is the row's last target). A document cut across rows continues in a later row at `end - 1`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSpan {
    pub row: u32,
    pub source: u32,
    pub doc: u64,
    pub start: u32,
    pub end: u32,
    pub at: u32,
}

/// Latent patch vectors of every continuous segment in the batch, flattened.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latents {
    pub dim: usize,
    /// `[n_patches, dim]` row-major.
    #[serde(skip)]
    pub data: Vec<f16>,
    /// For each patch row, its flat position `b * seq_len + t` in the batch.
    pub positions: Vec<u32>,
}

impl Batch {
    /// Number of positions (`batch_size * seq_len`).
    pub fn numel(&self) -> usize {
        self.batch_size * self.seq_len
    }
}
