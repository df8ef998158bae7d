//! The crate's one error type: every variant names the file (or source) and the operation.

use std::path::PathBuf;

/// Result alias used across motley-tokenizers.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Everything that can go wrong while fitting, loading or running a tokenizer.
///
/// `source` fields are human-readable references to the input (a path, or something like
/// `train.parquet#17`), so a bad record can be found again.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{op} {path}: {err}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    /// The image bytes could not be decoded (undecodable, truncated, unsupported format).
    #[error("cannot decode image {source_name}: {msg}")]
    ImageDecode { source_name: String, msg: String },
    /// The image header declares dimensions beyond the configured limits (decompression bomb guard).
    #[error("image {source_name} is too large: {msg}")]
    ImageTooLarge { source_name: String, msg: String },
    /// The image exists but has no pixels or a degenerate shape.
    #[error("image {source_name} is empty or degenerate: {width}x{height}")]
    ImageEmpty { source_name: String, width: u32, height: u32 },
    /// Audio that the demuxer or decoder rejected.
    #[error("cannot decode audio {source_name}: {msg}")]
    AudioDecode { source_name: String, msg: String },
    /// Audio that decodes to zero samples (or too few for a single frame).
    #[error("audio {source_name} has no samples to tokenize ({samples} samples at {rate} Hz)")]
    AudioEmpty { source_name: String, samples: usize, rate: u32 },
    /// Resampling failed (bad rate, resampler construction).
    #[error("cannot resample audio {source_name} from {from} Hz: {msg}")]
    Resample { source_name: String, from: u32, msg: String },
    /// Errors from the Hugging Face `tokenizers` crate (training, loading, encoding).
    #[error("text tokenizer {op} {what}: {msg}")]
    Text { op: &'static str, what: String, msg: String },
    /// A saved tokenizer file that is malformed or of the wrong kind.
    #[error("bad tokenizer file {path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// A pretrained model folder or file that cannot be run: unknown architecture, missing or
    /// misshapen tensor (named), unsupported configuration.
    #[error("model {path}: {msg}")]
    Model { path: PathBuf, msg: String },
    /// A segment handed to decode that this tokenizer cannot have produced.
    #[error("cannot decode segment{}: {msg}", source_name.as_ref().map(|s| format!(" from {s}")).unwrap_or_default())]
    BadSegment { source_name: Option<String>, msg: String },
    /// Invalid configuration (codebook size, patch size, rates...).
    #[error("invalid {what}: {msg}")]
    Config { what: &'static str, msg: String },
    /// A fit that had nothing (or too little) to learn from.
    #[error("cannot fit {what}: {msg}")]
    NoData { what: &'static str, msg: String },
    /// Encoding a preview (PNG, WAV) failed.
    #[error("cannot write {what}: {msg}")]
    Render { what: &'static str, msg: String },
}

impl TokenizerError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        TokenizerError::Io { op, path: path.into(), err }
    }

    pub(crate) fn bad_file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        TokenizerError::BadFile { path: path.into(), msg: msg.to_string() }
    }

    pub(crate) fn model(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        TokenizerError::Model { path: path.into(), msg: msg.to_string() }
    }

    pub(crate) fn config(what: &'static str, msg: impl std::fmt::Display) -> Self {
        TokenizerError::Config { what, msg: msg.to_string() }
    }

    pub(crate) fn bad_segment(source_name: Option<&str>, msg: impl std::fmt::Display) -> Self {
        TokenizerError::BadSegment { source_name: source_name.map(str::to_string), msg: msg.to_string() }
    }
}

/// Runs third-party code that parses user bytes or files (symphonia, image, candle; ingest's
/// Parquet reader), returning its panic as the panic's message and where it was raised. Their
/// decoders assert or overflow on some malformed inputs instead of returning an error; caught
/// here, such an input costs one record, not the run. A panic caught here is not printed (the
/// caller reports the error: ingest in `errors.jsonl`), so a corrupt file in a long ingest
/// does not look like a crash on stderr; every other panic still reaches the previous hook.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    guard::install_hook();
    let outer = guard::GUARDED.replace(true);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    guard::GUARDED.set(outer);
    result.map_err(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        match guard::LOCATION.take() {
            Some(at) => format!("{msg} (at {at})"),
            None => msg,
        }
    })
}

mod guard {
    use std::cell::{Cell, RefCell};

    thread_local! {
        /// Inside [`super::catch_panic`] on this thread.
        pub(super) static GUARDED: Cell<bool> = const { Cell::new(false) };
        /// Where the last guarded panic on this thread was raised.
        pub(super) static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// Wraps the process's panic hook once: guarded panics record their location instead of
    /// printing; the rest go to the hook that was there before.
    pub(super) fn install_hook() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if GUARDED.get() {
                    let at = info.location().map(|l| format!("{}:{}", crate_relative(l.file()), l.line()));
                    LOCATION.set(at);
                } else {
                    previous(info);
                }
            }));
        });
    }

    /// `…/registry/src/index.crates.io-…/parquet-60.1.0/src/x.rs` → `parquet-60.1.0/src/x.rs`.
    fn crate_relative(file: &str) -> &str {
        match file.find("/registry/src/") {
            Some(i) => {
                let rest = &file[i + "/registry/src/".len()..];
                rest.split_once('/').map_or(rest, |(_, tail)| tail)
            }
            None => file,
        }
    }

    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    mod tests {
        #[test]
        fn guarded_panics_carry_their_location_and_unguarded_code_is_untouched() {
            let e = super::super::catch_panic(|| -> u32 { panic!("bad header") }).unwrap_err();
            assert!(e.starts_with("bad header (at ") && e.contains("error.rs:"), "{e}");
            assert_eq!(super::super::catch_panic(|| 7).unwrap(), 7);
            assert!(!super::GUARDED.get(), "the flag is reset after the call");
            assert_eq!(
                super::crate_relative("/root/.cargo/registry/src/index.crates.io-1949/parquet-60.1.0/src/a.rs"),
                "parquet-60.1.0/src/a.rs"
            );
            assert_eq!(super::crate_relative("src/x.rs"), "src/x.rs");
        }
    }
}
