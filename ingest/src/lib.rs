//! motley-ingest: turns text files, JSONL, Parquet, WebDataset tars, image folders, audio and interleaved JSONL
//! into a motley shard corpus with the motley tokenizers — parallel, resumable, bounded in memory.
//!
//! ```no_run
//! # fn main() -> motley_ingest::Result<()> {
//! use motley_ingest::{IngestConfig, Recipe, ingest};
//! let mut recipe = Recipe::from_file("data/sample/recipe.toml".as_ref())?;
//! recipe.locate_tokenizers("runs/demo/tokenizers".as_ref());
//! let cfg = IngestConfig {
//!     recipe,
//!     out: "runs/demo/corpus".into(),
//!     workers: None,
//!     limit: None,
//!     part: Default::default(),
//!     max_errors: None,
//!     overwrite: true,
//!     progress: true,
//!     upload: None,
//!     fetch_ahead: 4,
//! };
//! let summary = ingest(&cfg)?;
//! println!("{} documents", summary.documents);
//! # Ok(()) }
//! ```

pub mod bench;
pub mod encode;
pub mod error;
pub mod parquet_source;
pub mod plan;
pub mod progress;
pub mod recipe;
pub mod remote_input;
pub mod run;
pub mod source;
pub mod webdataset;

pub use error::{Error, Reason, RecordError, Result};
pub use plan::{Part, Task, plan, select_part};
pub use recipe::{ImageMode, Recipe, RecipeOptions, SourceKind, SourceSpec, SpeechMode, TokenizerPaths};
pub use run::{
    ERRORS_FILE, IngestConfig, LOCK_FILE, MAX_WORKERS, ModalityCounts, OutputLock, STATE_DIR, Summary, TOKENIZERS_DIR,
    TaskMarker, ingest, lock_output, read_errors,
};
