//! `motley shards verify`: every checksum, every index entry and record, every manifest total.
//! Read-only: lists each problem with its shard and byte offset and exits non-zero on any.

use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use motley_shards::{Corpus, MANIFEST_NAME, Manifest, Problem, ShardError, ShardReader, VerifyReport};
use serde::Serialize;

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Corpus directory (holds manifest.json).
    dir: PathBuf,
}

#[derive(Debug, Serialize)]
struct Out<'a> {
    ok: bool,
    dir: String,
    #[serde(flatten)]
    report: &'a VerifyReport,
}

/// The error returned after the report is printed, so the exit status is non-zero.
#[derive(Debug)]
struct Failed(usize);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "verify found {} problem{}", self.0, if self.0 == 1 { "" } else { "s" })
    }
}

impl std::error::Error for Failed {}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(format!("verifying {}", args.dir.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let report = verify_dir(&args.dir);
    spinner.finish_and_clear();
    let out = Out { ok: report.is_ok(), dir: args.dir.display().to_string(), report: &report };
    if ctx.json {
        output::json(&out)?;
    } else {
        let mut w = std::io::stdout().lock();
        for p in &report.problems {
            writeln!(w, "{}", describe(p))?;
        }
        let status = if report.is_ok() { "OK" } else { "FAILED" };
        writeln!(
            w,
            "{status}: {} shards, {} documents, {} chunks, {} bytes checked, {} problems",
            report.shards,
            report.docs,
            report.chunks,
            report.bytes,
            report.problems.len()
        )?;
    }
    if report.is_ok() { Ok(()) } else { Err(Failed(report.problems.len()).into()) }
}

/// One problem as a line: `shard @ offset [kind] message`.
fn describe(p: &Problem) -> String {
    let shard = p.shard.as_deref().unwrap_or(MANIFEST_NAME);
    let at = p.offset.map_or_else(|| "-".to_string(), |o| o.to_string());
    format!("{shard} @ {at} [{}] {}", p.kind, p.message)
}

/// Verifies a corpus directory. When the manifest itself is inconsistent (totals that do not
/// add up, say) the library refuses to open the corpus; the shards are then still checked one
/// by one against their manifest entries, so one bad total does not hide corrupt shards.
fn verify_dir(dir: &Path) -> VerifyReport {
    match Corpus::open(dir) {
        Ok(corpus) => corpus.verify(),
        Err(e) => {
            let mut report = VerifyReport::default();
            report.problems.push(problem(None, &e));
            if let Some(manifest) = parse_unchecked(dir) {
                let mut first_doc = 0u64;
                for entry in &manifest.shards {
                    verify_shard(dir, &manifest, entry, first_doc, &mut report);
                    first_doc = first_doc.saturating_add(entry.num_docs);
                }
            }
            report
        }
    }
}

fn problem(shard: Option<&str>, e: &ShardError) -> Problem {
    Problem::from_error(shard, e)
}

/// The manifest as written, without its self-consistency check (None if it does not parse).
fn parse_unchecked(dir: &Path) -> Option<Manifest> {
    let bytes = std::fs::read(dir.join(MANIFEST_NAME)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Per-shard checks for the fallback path: open (header, footer, index checksum), whole-file
/// blake3, agreement with the manifest entry, every chunk checksum and every record.
/// `first_doc` is the corpus-wide id of the shard's first document (for the messages).
fn verify_shard(
    dir: &Path,
    manifest: &Manifest,
    entry: &motley_shards::ShardStats,
    first_doc: u64,
    report: &mut VerifyReport,
) {
    report.shards += 1;
    let name = entry.name.as_str();
    if name.contains(['/', '\\']) || name == ".." {
        report.problems.push(Problem {
            shard: Some(name.to_string()),
            kind: "manifest".into(),
            doc: None,
            offset: None,
            message: format!("shard name {name:?} is not a plain file name"),
        });
        return;
    }
    let path = dir.join(name);
    let reader = match ShardReader::open(&path) {
        Ok(r) => r,
        Err(e) => {
            report.problems.push(problem(Some(name), &e));
            return;
        }
    };
    report.bytes += reader.len_bytes();
    let actual = blake3::hash(reader.bytes()).to_hex().to_string();
    if actual != entry.blake3 {
        let e = ShardError::Checksum {
            path: path.clone(),
            what: "shard blake3",
            offset: 0,
            expected: format!("blake3:{}", entry.blake3),
            actual: format!("blake3:{actual}"),
        };
        report.problems.push(problem(Some(name), &e));
    }
    if let Err(e) = reader.check_against(entry, &manifest.vocab) {
        report.problems.push(problem(Some(name), &e));
    }
    for c in 0..reader.num_chunks() {
        report.chunks += 1;
        if let Err(e) = reader.check_chunk(c) {
            report.problems.push(problem(Some(name), &e));
        }
    }
    for local in 0..reader.num_docs() {
        report.docs += 1;
        if let Err(e) = reader.get(local) {
            report.problems.push(problem(Some(name), &e.with_global(first_doc.saturating_add(local))));
        }
    }
}
