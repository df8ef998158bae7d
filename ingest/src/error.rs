//! Errors of motley-ingest: fatal run errors (`Error`) and skippable per-record problems (`RecordError`).

use std::path::PathBuf;

/// A fatal error that stops the ingest run. Skippable problems with single records are
/// [`RecordError`]s instead and end up in `errors.jsonl`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recipe {path}: {message}")]
    Recipe { path: PathBuf, message: String },
    #[error("invalid option: {0}")]
    Options(String),
    #[error("bad glob pattern {pattern:?}: {message}")]
    Glob { pattern: String, message: String },
    #[error("source {source_name:?}: no input files matched {patterns:?}")]
    NoInputs { source_name: String, patterns: Vec<String> },
    #[error("parquet {path}: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("shards in {path}: {message}")]
    Shards { path: PathBuf, message: String },
    #[error(
        "output {path} already holds {what}; pass --overwrite to replace it (a killed run of the same command resumes without it)"
    )]
    OutputExists { path: PathBuf, what: String },
    #[error(
        "output {path} is being written by another `motley ingest` (it holds the lock {lock}); wait for it to finish or choose another --out"
    )]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("output {path} is not an ingest output (no manifest.json or .ingest/); refusing to delete it")]
    NotACorpus { path: PathBuf },
    #[error(
        "too many bad records: {errors} > --max-errors {max}; stopped. Finished tasks in {out} stay valid and are skipped when the run is resumed; see {out}/errors.jsonl"
    )]
    TooManyErrors { errors: u64, max: u64, out: PathBuf },
    #[error("task marker {path}: {message}")]
    Marker { path: PathBuf, message: String },
    /// An input in an object store could not be listed or fetched (or may not be used).
    #[error("input {uri}: {message}")]
    Remote { uri: String, message: String },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { op, path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a record was skipped. The string names are stable: they key `errors_by_reason` in the
/// summary and the `reason` field of `errors.jsonl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The file (or a referenced file) could not be read.
    Io,
    /// A referenced image or audio file does not exist.
    MissingFile,
    /// Bytes that should be UTF-8 text are not.
    InvalidUtf8,
    /// A JSONL line is not valid JSON, or not an object.
    Json,
    /// A required key/column is absent or null in this record.
    MissingField,
    /// A field has the wrong type (e.g. a number where text is expected).
    WrongType,
    /// The record (or file) holds nothing to tokenize.
    Empty,
    /// A Parquet file or row group could not be decoded.
    Parquet,
    /// The image tokenizer rejected the bytes (truncated, not an image, ...).
    Image,
    /// The speech tokenizer rejected the bytes (not audio, zero frames, ...).
    Audio,
    /// The text tokenizer failed.
    Text,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Io => "io",
            Reason::MissingFile => "missing_file",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::Json => "json",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::Empty => "empty",
            Reason::Parquet => "parquet",
            Reason::Image => "image",
            Reason::Audio => "audio",
            Reason::Text => "text",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One skipped record, as written to `errors.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecordError {
    /// The input file the record came from.
    pub file: String,
    /// Record index inside the file (line for JSONL, row for Parquet, 0 for whole files);
    /// None when the whole file failed before any record was read.
    pub record: Option<u64>,
    /// Byte offset of the record in the file when known (JSONL lines).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub byte_offset: Option<u64>,
    pub reason: Reason,
    pub error: String,
}
