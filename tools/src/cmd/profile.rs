//! `motley profile`: the operators by self time (and device kernels, and motley's phases) of the
//! traces `train.profile_steps` wrote, on disk or in a run's object store, as
//! `prof.key_averages().table()` prints them.

use std::path::{Path, PathBuf};

use anyhow::bail;
use motley_trainer::profile::{TraceSummary, summarize};

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  motley train --preset tiny --data corpus --set 'train.profile_steps=[10,12]'\n  motley \
                  profile runs/tiny-mot\n  motley --json profile runs/tiny-mot/profile/steps-10-12/rank-00000.pt.trace.json"
)]
pub struct Args {
    /// A trace (`*.pt.trace.json`), or a folder holding some (a run: every rank's, every
    /// window), or a run in an object store (`s3://…`: the traces its ranks copied there).
    path: PathBuf,
    /// Rows per table.
    #[arg(long, default_value_t = 15)]
    top: usize,
}

fn traces(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            traces(&p, out)?;
        } else if p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".pt.trace.json")) {
            out.push(p);
        }
    }
    Ok(())
}

/// The traces under an object-store location (a run there: every rank copied its own), fetched
/// into a temporary folder: (local copy, object).
fn fetch_traces(uri: &str, dir: &Path, ctx: &Ctx) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    for (i, (object, size)) in motley_remote::list_inputs(uri, &ctx.remote)?.into_iter().enumerate() {
        if object.ends_with(".pt.trace.json") {
            let local = dir.join(format!("{i}.pt.trace.json"));
            motley_remote::fetch_input(&object, size, &local, &ctx.remote)?;
            out.push((local, object));
        }
    }
    Ok(out)
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    if let Some(uri) = args.path.to_str().filter(|s| crate::remote::is_remote(Path::new(s))) {
        let tmp = tempfile::tempdir()?;
        let fetched = fetch_traces(uri, tmp.path(), ctx)?;
        if fetched.is_empty() {
            bail!("{uri}: no *.pt.trace.json under it (train with --set 'train.profile_steps=[FIRST,LAST]')");
        }
        let mut summaries = Vec::new();
        for (local, object) in fetched {
            let mut s = summarize(&local)?;
            s.trace = PathBuf::from(object);
            summaries.push(s);
        }
        return print(&summaries, args.top, ctx);
    }
    let mut found = Vec::new();
    if args.path.is_dir() {
        traces(&args.path, &mut found).map_err(|e| anyhow::anyhow!("list {}: {e}", args.path.display()))?;
        if found.is_empty() {
            bail!(
                "{}: no *.pt.trace.json under it (train with --set 'train.profile_steps=[FIRST,LAST]')",
                args.path.display()
            );
        }
    } else {
        found.push(args.path.clone());
    }
    let summaries: Vec<TraceSummary> = found.iter().map(|p| summarize(p)).collect::<Result<_, _>>()?;
    print(&summaries, args.top, ctx)
}

fn print(summaries: &[TraceSummary], top: usize, ctx: &Ctx) -> anyhow::Result<()> {
    if ctx.json {
        output::json(&summaries)
    } else {
        let tables: Vec<String> = summaries.iter().map(|s| s.table(top)).collect();
        output::line(tables.join("\n"))
    }
}
