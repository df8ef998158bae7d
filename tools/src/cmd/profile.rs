//! `motley profile`: the operators by self time (and device kernels, and motley's phases) of the
//! traces `train.profile_steps` wrote, as `prof.key_averages().table()` prints them.

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
    /// A trace (`*.pt.trace.json`), or a folder holding some (a run: every rank's, every window).
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

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
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
    if ctx.json {
        output::json(&summaries)
    } else {
        let tables: Vec<String> = summaries.iter().map(|s| s.table(args.top)).collect();
        output::line(tables.join("\n"))
    }
}
