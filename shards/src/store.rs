//! Where a corpus's shard files come from when they are not plain files in its directory: a
//! [`ShardStore`] (the remote cache of `motley-remote`) hands the reader a local, checked file
//! per shard on demand, fetches ahead on hints and may evict released shards. The binary that
//! links an object-store client registers an opener for `scheme://` locations, so every place
//! that opens a corpus by path (the loader, the trainer, the CLI) accepts them without this
//! crate depending on one.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use crate::error::{Result, ShardError};
use crate::reader::Corpus;
use crate::writer::ShardStats;

/// Provides shard files to a [`Corpus`].
pub trait ShardStore: Send + Sync + std::fmt::Debug {
    /// A local path holding shard `index` (manifest entry `entry`), complete and checked;
    /// blocks while it is fetched.
    fn ensure(&self, index: usize, entry: &ShardStats) -> Result<PathBuf>;
    /// The shards the reader needs next, in order (fetch ahead).
    fn upcoming(&self, _order: &[usize]) {}
    /// The corpus no longer maps shard `index`.
    fn released(&self, _index: usize) {}
}

/// File in a remote corpus's cache folder naming its location: opening the folder opens the
/// remote corpus (so a path recorded in a run's config keeps fetching what it lacks).
pub const REMOTE_MARKER: &str = ".motley-remote";

type Opener = dyn Fn(&str) -> Result<Corpus> + Send + Sync;

static OPENER: OnceLock<Box<Opener>> = OnceLock::new();

/// Installs the opener for `scheme://` corpus locations (once per process; later calls are
/// ignored and return false).
pub fn set_remote_opener(f: impl Fn(&str) -> Result<Corpus> + Send + Sync + 'static) -> bool {
    OPENER.set(Box::new(f)).is_ok()
}

/// Whether `location` names a remote corpus (`s3://`, `gs://`, `az://`, `https://`, …).
pub fn is_remote(location: &str) -> bool {
    location.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
    })
}

pub(crate) fn open_remote(uri: &str) -> Result<Corpus> {
    match OPENER.get() {
        Some(open) => open(uri),
        None => Err(ShardError::Config(format!(
            "{uri}: remote corpora need the object-store support of the motley binary (motley-remote)"
        ))),
    }
}

/// Keeps a store alive beside the corpus that uses it (for callers holding only the store).
pub type SharedStore = Arc<dyn ShardStore>;
