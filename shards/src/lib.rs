//! motley-shards: the modality-tagged token shard format, its crash-safe writer, the
//! memory-mapped reader and the streaming loader that feeds the trainer. No libtorch here.
//!
//! Write with [`ShardWriter`] / [`CorpusWriter`] and [`Manifest`], read with [`Corpus`],
//! train from [`loader::Loader`]. The byte layout is specified in docs/FORMAT.md.

pub mod batch;
pub mod bench;
pub mod cache;
pub mod error;
pub mod format;
pub mod loader;
pub mod manifest;
pub mod order;
pub mod perm;
pub mod reader;
pub mod rowindex;
pub mod store;
pub mod types;
mod verify;
pub mod writer;

pub use batch::{Batch, DocSpan, Latents};
pub use cache::ChunkCache;
pub use error::{Result, ShardError};
pub use format::{Compression, ModalityStats};
pub use loader::{Loader, LoaderConfig, LoaderState, Source, Split};
pub use manifest::{MANIFEST_NAME, Manifest};
pub use order::Shuffle;
pub use reader::{
    Corpus, DocIter, DocumentRef, Ids, Problem, SegmentRef, SegmentView, ShardReader, VerifyReport, is_eval_doc,
};
pub use rowindex::RowIndexMode;
pub use types::{Document, Modality, ModalityVocab, SPECIAL_NAMES, Segment, SegmentData, SegmentMeta, Vocab};
pub use writer::{CorpusWriter, PerModality, ShardStats, ShardWriter, WriterProperties, WriterPropertiesBuilder};
