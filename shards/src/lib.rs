//! motley-shards: the modality-tagged token shard format, its crash-safe writer, the
//! memory-mapped reader and the streaming loader that feeds the trainer. No libtorch here.

pub mod batch;
pub mod types;

pub use batch::{Batch, Latents};
pub use types::{Document, Modality, ModalityVocab, Segment, SegmentData, SegmentMeta, Vocab, SPECIAL_NAMES};
