//! The trainer's error type: every variant names the file, field or operation at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A bad or inconsistent configuration value (`path` is the TOML key or file).
    #[error("config {path}: {msg}")]
    Config { path: String, msg: String },
    /// A batch that does not fit the model (wrong lengths, ids outside the vocabulary).
    #[error("batch: {0}")]
    Batch(String),
    /// The data source failed (corpus path, loader state).
    #[error("data {path}: {msg}")]
    Data { path: String, msg: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("libtorch {op}: {source}")]
    Torch {
        op: String,
        #[source]
        source: tch::TchError,
    },
    /// A NaN or inf loss or gradient, with the step and the per-modality values.
    #[error("non-finite {what} at step {step}: {detail}")]
    NonFinite { what: &'static str, step: u64, detail: String },
    #[error("run directory {path}: {msg}")]
    RunDir { path: PathBuf, msg: String },
    /// torch's profiler failed, or a trace cannot be read.
    #[error("profile {path}: {msg}")]
    Profile { path: PathBuf, msg: String },
    #[error("plot {path}: {msg}")]
    Plot { path: PathBuf, msg: String },
    #[error("data parallel: {0}")]
    Distributed(String),
    /// Copying the run elsewhere failed (its checkpoints stay in the local run directory).
    #[error("{0}")]
    Mirror(String),
}

impl TrainError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
        let path = path.into();
        move |source| TrainError::Io { op, path, source }
    }

    pub(crate) fn torch(op: impl Into<String>) -> impl FnOnce(tch::TchError) -> TrainError {
        let op = op.into();
        move |source| TrainError::Torch { op, source }
    }
}
