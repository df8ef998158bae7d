//! A run copied somewhere else as it trains (an object store): the hook rank 0 calls after
//! each checkpoint and at the end, so copying never waits on the training loop nor the loop
//! on the copy. The trainer holds no network code; the `motley` binary implements it.

use std::path::{Path, PathBuf};

/// Where rank 0 sends its checkpoints. Implementations copy in the background: [`saved`]
/// only queues, and the checkpoint folder it returns from [`in_use`] is not pruned until its
/// copy is done.
///
/// [`saved`]: RunMirror::saved
/// [`in_use`]: RunMirror::in_use
pub trait RunMirror: Send + Sync {
    /// The checkpoint folder being copied now, which local pruning must leave alone.
    fn in_use(&self) -> Option<PathBuf>;
    /// `ckpt` is complete in `run`: copy it and the run's files. Returns an earlier copy's
    /// failure, which stops the run (its checkpoints stay on the local disk).
    fn saved(&self, run: &Path, ckpt: &Path) -> Result<(), String>;
    /// Waits until every queued checkpoint is copied (or one failed).
    fn wait(&self) -> Result<(), String>;
    /// The run ended and pruned its checkpoints: copy its final files and delete the copies
    /// of checkpoints it no longer has.
    fn finish(&self, run: &Path) -> Result<(), String>;
}
