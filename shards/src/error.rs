//! The one error type of motley-shards: every variant names the file and, where it applies,
//! the byte offset, document or segment, so a corrupt corpus can be located from the message.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = ShardError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// An OS-level failure (open, read, write, rename, fsync, mmap).
    #[error("{op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// A checksum did not match: the bytes at `offset` of `path` are corrupt.
    #[error("{}: {what} checksum mismatch at byte {offset}: expected {expected}, actual {actual}", path.display())]
    Checksum { path: PathBuf, what: &'static str, offset: u64, expected: String, actual: String },

    /// The file is shorter than its own header, footer or index says it should be.
    #[error("{}: truncated: {what} needs bytes {offset}..{end} but the file has {len}", path.display())]
    Truncated { path: PathBuf, what: &'static str, offset: u64, end: u64, len: u64 },

    /// Structurally invalid bytes (bad magic, impossible offsets, unknown enum values).
    #[error("{}: corrupt {what} at byte {offset}: {detail}", path.display())]
    Corrupt { path: PathBuf, what: &'static str, offset: u64, detail: String },

    /// A document that breaks the format or the corpus's vocabulary (an id outside its
    /// modality's block, a wrong width or latent dim, an index entry or record out of bounds).
    /// `doc` is the shard-local document number, `global` its corpus-wide id when known;
    /// `offset` is a file offset, or an offset in uncompressed chunk `in_chunk` (zstd).
    #[error(
        "{}: document {doc}{}: corrupt {what} at byte {offset}{}: {detail}",
        path.display(),
        global.map_or(String::new(), |g| format!(" (corpus document {g})")),
        in_chunk.map_or(String::new(), |c| format!(" of uncompressed chunk {c}"))
    )]
    Record {
        path: PathBuf,
        doc: u64,
        global: Option<u64>,
        what: &'static str,
        offset: u64,
        in_chunk: Option<u32>,
        detail: String,
    },

    /// A format version this build cannot read.
    #[error("{}: unsupported format version {found} (this build reads version {supported})", path.display())]
    Version { path: PathBuf, found: u32, supported: u32 },

    /// A shard listed in the manifest is absent from the corpus directory.
    #[error("{}: shard listed in the manifest is missing", path.display())]
    MissingShard { path: PathBuf },

    /// The manifest and a shard disagree on some field.
    #[error("{}: manifest says {field} = {manifest}, shard has {actual}", path.display())]
    ManifestMismatch { path: PathBuf, field: &'static str, manifest: String, actual: String },

    /// The manifest could not be parsed or is inconsistent with itself.
    #[error("{}: invalid manifest: {detail}", path.display())]
    Manifest { path: PathBuf, detail: String },

    /// A document that cannot be written (ids out of the vocabulary, bad latent shape, ...).
    #[error("document {doc}, segment {segment}: {detail}")]
    InvalidDocument { doc: u64, segment: usize, detail: String },

    /// A document id past the end of the corpus.
    #[error("document {doc} out of range: corpus has {num_docs} documents")]
    DocOutOfRange { doc: u64, num_docs: u64 },

    /// A loader or writer configuration that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A loader state that does not belong to these sources / this configuration.
    #[error("cannot resume: {0}")]
    Resume(String),

    /// An object of a remote corpus could not be fetched (after retries, for transient errors).
    #[error("{object}: {detail}")]
    Remote { object: String, detail: String },
}

impl ShardError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        ShardError::Io { path: path.into(), op, source }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        what: &'static str,
        offset: u64,
        detail: impl Into<String>,
    ) -> Self {
        ShardError::Corrupt { path: path.into(), what, offset, detail: detail.into() }
    }

    /// Byte offset the error points at, when it has one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            ShardError::Checksum { offset, .. }
            | ShardError::Truncated { offset, .. }
            | ShardError::Corrupt { offset, .. }
            | ShardError::Record { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    /// The corpus-wide id of the document the error is about, when known.
    pub fn doc(&self) -> Option<u64> {
        match self {
            ShardError::Record { global, .. } => *global,
            ShardError::InvalidDocument { doc, .. } | ShardError::DocOutOfRange { doc, .. } => Some(*doc),
            _ => None,
        }
    }

    /// Ties a structural error met while reading shard-local document `doc` to that document
    /// (other errors, such as checksums, pass through unchanged).
    pub(crate) fn in_document(self, doc: u64) -> Self {
        match self {
            ShardError::Corrupt { path, what, offset, detail } => {
                ShardError::Record { path, doc, global: None, what, offset, in_chunk: None, detail }
            }
            e => e,
        }
    }

    /// Records the corpus-wide id of the document a [`ShardError::Record`] is about.
    pub fn with_global(self, id: u64) -> Self {
        match self {
            ShardError::Record { path, doc, what, offset, in_chunk, detail, .. } => {
                ShardError::Record { path, doc, global: Some(id), what, offset, in_chunk, detail }
            }
            e => e,
        }
    }

    /// The file the error is about, when it has one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            ShardError::Io { path, .. }
            | ShardError::Checksum { path, .. }
            | ShardError::Truncated { path, .. }
            | ShardError::Corrupt { path, .. }
            | ShardError::Record { path, .. }
            | ShardError::Version { path, .. }
            | ShardError::MissingShard { path }
            | ShardError::ManifestMismatch { path, .. }
            | ShardError::Manifest { path, .. } => Some(path),
            _ => None,
        }
    }

    /// A short stable name of the error kind (for reports and JSON output).
    pub fn kind(&self) -> &'static str {
        match self {
            ShardError::Io { .. } => "io",
            ShardError::Checksum { .. } => "checksum",
            ShardError::Truncated { .. } => "truncated",
            // A bad record is corrupt data too; `doc()` tells which document.
            ShardError::Corrupt { .. } | ShardError::Record { .. } => "corrupt",
            ShardError::Version { .. } => "version",
            ShardError::MissingShard { .. } => "missing_shard",
            ShardError::ManifestMismatch { .. } => "manifest_mismatch",
            ShardError::Manifest { .. } => "manifest",
            ShardError::InvalidDocument { .. } => "invalid_document",
            ShardError::DocOutOfRange { .. } => "doc_out_of_range",
            ShardError::Config(_) => "config",
            ShardError::Resume(_) => "resume",
            ShardError::Remote { .. } => "remote",
        }
    }
}
