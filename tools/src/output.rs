//! Shared CLI plumbing: logging set-up, stdout results, exit codes, closed-pipe handling.

use std::io::Write;

/// Global options every subcommand sees.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub json: bool,
    /// How corpora in object stores are cached and fetched (global `--cache-dir`, `--cache-limit`).
    pub remote: motley_remote::RemoteOptions,
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

/// Writes one line of human-readable result to stdout.
pub fn line(s: impl std::fmt::Display) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")?;
    Ok(())
}

/// Writes a JSON value (pretty) to stdout.
pub fn json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Exit status of a subcommand that is not built yet (the demo names such stages).
pub const EXIT_NOT_BUILT: i32 = 3;

/// The error of a subcommand whose issue has not landed yet.
#[derive(Debug)]
pub struct NotBuilt(pub String);

impl std::fmt::Display for NotBuilt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`motley {}` is not built yet in this version of motley", self.0)
    }
}

impl std::error::Error for NotBuilt {}

/// A subcommand whose issue has not landed yet: say so plainly and fail. (Every subcommand is
/// built at the moment; kept for the next one, with its exit code tested below.)
#[allow(dead_code)]
pub fn not_built(what: &str) -> anyhow::Result<()> {
    Err(NotBuilt(what.to_string()).into())
}

/// 0 on success or when stdout was closed early (a pipe into `head`); 3 when the
/// subcommand is not built yet; 1 on any other error.
pub fn exit_code(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            let broken_pipe = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                    // `--json` output writes through serde_json, which wraps the io error.
                    || c.downcast_ref::<serde_json::Error>()
                        .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
            });
            if broken_pipe {
                return 0;
            }
            eprintln!("error: {}", message(&e));
            if e.downcast_ref::<NotBuilt>().is_some() { EXIT_NOT_BUILT } else { 1 }
        }
    }
}

/// The error and its causes on one line, like anyhow's `{:#}`, but a cause whose text the
/// message already ends with is not repeated: the library errors print their source in their
/// own message (`read FILE: No such file…`) and mark it `#[source]` too.
pub fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_tell_unbuilt_apart_from_failures() {
        assert_eq!(exit_code(Ok(())), 0);
        assert_eq!(exit_code(not_built("something")), EXIT_NOT_BUILT);
        assert_eq!(exit_code(Err(anyhow::anyhow!("a real failure"))), 1);
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        #[derive(Debug)]
        struct Read {
            source: std::io::Error,
        }
        impl std::fmt::Display for Read {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "read model.safetensors: {}", self.source)
            }
        }
        impl std::error::Error for Read {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.source)
            }
        }
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(Read { source: io() }).context("resuming run");
        assert_eq!(message(&e), "resuming run: read model.safetensors: No such file or directory");
        let plain = anyhow::Error::new(io()).context("open x");
        assert_eq!(message(&plain), "open x: No such file or directory");
    }
}
