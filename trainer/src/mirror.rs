//! A run copied somewhere else as it trains (an object store): the hook the ranks call after
//! each checkpoint and at the end, so copying never waits on the training loop nor the loop
//! on the copy. The trainer holds no network code; the `motley` binary implements it.

use std::path::{Path, PathBuf};

/// Where a run's checkpoints go. Every rank holds one: rank 0 hands it each complete
/// checkpoint ([`saved`], which only queues; the folder it returns from [`in_use`] is not
/// pruned until its copy is done), and with per-rank checkpoints every rank copies its own
/// files first ([`put_run_file`]), so no node needs to see another's disk.
///
/// [`saved`]: RunMirror::saved
/// [`in_use`]: RunMirror::in_use
/// [`put_run_file`]: RunMirror::put_run_file
pub trait RunMirror: Send + Sync {
    /// The checkpoint folder being copied now, which local pruning must leave alone.
    fn in_use(&self) -> Option<PathBuf>;
    /// `ckpt` is complete in `run`: copy it and the run's files (a per-rank checkpoint's rank
    /// files are already there: checked, not copied again). Returns an earlier copy's
    /// failure, which stops the run (its checkpoints stay on the local disk).
    fn saved(&self, run: &Path, ckpt: &Path) -> Result<(), String>;
    /// A file of this rank's under the run (`rel`, such as `profile/steps-4-5/rank-00001.pt.trace.json`
    /// or a per-rank checkpoint's `checkpoints/step-N/model-rank-…`), copied now: what only the
    /// rank that wrote it has. Per-rank checkpoint files are copied on the checkpoint writer's
    /// thread, before the ranks agree the checkpoint is written.
    fn put_run_file(&self, rel: &str, path: &Path) -> Result<(), String>;
    /// Waits until every queued checkpoint is copied (or one failed).
    fn wait(&self) -> Result<(), String>;
    /// The run ended and pruned its checkpoints: copy its final files and delete the copies
    /// of checkpoints it no longer has.
    fn finish(&self, run: &Path) -> Result<(), String>;
}
