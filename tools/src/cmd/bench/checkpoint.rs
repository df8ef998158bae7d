//! `motley bench checkpoint`: how long training stalls for its checkpoints, written on the
//! loop's thread (the baseline) against `train.checkpoint_async` (a host copy, then written in
//! the background), the same run twice in one process: seconds in checkpointing, and the
//! whole run's wall time. With `--nproc N` (N ≥ 2) it compares the formats instead: N ranks
//! under ZeRO-3 (`motley train --nproc N`), rank 0 gathering the model and moments and writing
//! them whole (`full`, the baseline) against every rank writing its own chunk (`per_rank`).

use motley_trainer::{TrainConfig, Trainer};

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  motley bench checkpoint\n  motley bench checkpoint --preset 94m --steps 12 --every 4 --json\n  motley bench checkpoint --nproc 2 --preset 94m"
)]
pub struct Args {
    /// Model preset (the synthetic corpus feeds it; sequence and batch are kept small so the
    /// checkpoints, not the steps, dominate).
    #[arg(long, default_value = "37m")]
    preset: String,
    #[arg(long, default_value_t = 8)]
    steps: u64,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 2)]
    every: u64,
    /// Runs of each mode; the fastest counts (the machine may be shared).
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Where the runs write (a temporary folder inside it; default: the system's).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Ranks (2 or more: compare `train.checkpoint_format` full vs per_rank under ZeRO-3,
    /// both written in line; 1: compare in-line vs async writes).
    #[arg(long, default_value_t = 1)]
    nproc: usize,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    mode: &'static str,
    steps: u64,
    checkpoints: u64,
    /// Bytes of one checkpoint (weights + moments + meta).
    checkpoint_bytes: u64,
    wall_s: f64,
    checkpoint_s: f64,
    checkpoint_s_per_checkpoint: f64,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    preset: String,
    params: i64,
    rows: Vec<Row>,
    /// Ranks of each run.
    nproc: usize,
    /// Checkpointing stall (rank 0's), baseline ÷ candidate (sync ÷ async, or full ÷
    /// per_rank): how many times less the loop waits.
    stall_ratio: f64,
    /// Wall time of the run, baseline ÷ candidate.
    wall_ratio: f64,
}

fn settings(args: &Args) -> Vec<String> {
    [
        "data.synthetic=true".into(),
        "data.seq_len=128".into(),
        "data.batch_size=2".into(),
        "optim.grad_accum=1".into(),
        "optim.global_batch=0".into(),
        format!("train.steps={}", args.steps),
        format!("train.checkpoint_every={}", args.every),
        "train.keep_checkpoints=1".into(),
        "train.eval_every=0".into(),
        "train.log_every=1000".into(),
        format!("train.device=\"{}\"", args.device),
    ]
    .into()
}

/// Checkpoints a run of `args.steps` writes.
fn checkpoints(args: &Args) -> u64 {
    args.steps / args.every.max(1) + u64::from(!args.steps.is_multiple_of(args.every.max(1)))
}

/// Bytes of the run's last checkpoint.
fn checkpoint_bytes(run: &std::path::Path) -> anyhow::Result<u64> {
    let last = motley_trainer::checkpoint::resolve(run)?;
    Ok(std::fs::read_dir(&last)?.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
}

fn one_run(args: &Args, asynchronous: bool, dir: &std::path::Path) -> anyhow::Result<(Row, i64)> {
    let mut sets = settings(args);
    sets.push(format!("train.checkpoint_async={asynchronous}"));
    let cfg = TrainConfig::layered(&args.preset, None, &sets)?;
    let run = dir.join(if asynchronous { "async" } else { "sync" });
    motley_trainer::train::prepare_run_dir(&run, true)?;
    let mut t = Trainer::new(cfg)?;
    t.verbose = false;
    t.attach_run_dir(&run)?;
    let s = t.run()?;
    let checkpoints = checkpoints(args);
    let row = Row {
        mode: if asynchronous { "async" } else { "sync" },
        steps: s.steps,
        checkpoints,
        checkpoint_bytes: checkpoint_bytes(&run)?,
        wall_s: s.wall_s,
        checkpoint_s: s.checkpoint_s,
        checkpoint_s_per_checkpoint: s.checkpoint_s / checkpoints.max(1) as f64,
    };
    Ok((row, s.params))
}

/// One run of `args.nproc` ranks under ZeRO-3 through `motley train --nproc`, in `format`.
fn ranks_run(args: &Args, format: &'static str, dir: &std::path::Path) -> anyhow::Result<(Row, i64)> {
    let run = dir.join(format);
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["--json", "train", "--overwrite", "--preset", &args.preset, "--nproc", &args.nproc.to_string()]);
    cmd.arg("--out").arg(&run);
    let mut sets = settings(args);
    sets.extend([
        "train.zero=3".into(),
        "train.activation_checkpointing=true".into(),
        format!("train.checkpoint_format=\"{format}\""),
    ]);
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
    anyhow::ensure!(out.status.success(), "motley train --nproc {} ({format}) failed", args.nproc);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let num = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let checkpoints = checkpoints(args);
    let row = Row {
        mode: format,
        steps: s["steps"].as_u64().unwrap_or(0),
        checkpoints,
        checkpoint_bytes: checkpoint_bytes(&run)?,
        wall_s: num("wall_s"),
        checkpoint_s: num("checkpoint_s"),
        checkpoint_s_per_checkpoint: num("checkpoint_s") / checkpoints.max(1) as f64,
    };
    Ok((row, s["params"].as_i64().unwrap_or(0)))
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let tmp = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let mut best: [Option<Row>; 2] = [None, None];
    let mut params = 0;
    // Alternating, so both modes see the same state of a shared machine.
    for _ in 0..args.repeat.max(1) {
        for (i, candidate) in [false, true].into_iter().enumerate() {
            let (row, p) = if args.nproc > 1 {
                ranks_run(&args, if candidate { "per_rank" } else { "full" }, tmp.path())?
            } else {
                one_run(&args, candidate, tmp.path())?
            };
            params = p;
            if best[i].as_ref().is_none_or(|b| row.checkpoint_s < b.checkpoint_s) {
                best[i] = Some(row);
            }
        }
    }
    let [Some(base), Some(candidate)] = best else { anyhow::bail!("no run finished") };
    let report = Report {
        preset: args.preset.clone(),
        params,
        nproc: args.nproc.max(1),
        stall_ratio: base.checkpoint_s / candidate.checkpoint_s.max(1e-9),
        wall_ratio: base.wall_s / candidate.wall_s.max(1e-9),
        rows: vec![base, candidate],
    };
    if ctx.json {
        return output::json(&report);
    }
    output::line(format!(
        "{} ({:.1} M parameters) on {} rank(s), {} steps, a checkpoint every {} ({:.0} MB each), fastest of {}:",
        report.preset,
        report.params as f64 / 1e6,
        report.nproc,
        args.steps,
        args.every,
        report.rows[0].checkpoint_bytes as f64 / 1e6,
        args.repeat
    ))?;
    output::line(format!("{:<8} {:>12} {:>16} {:>10}", "mode", "stall (s)", "per checkpoint", "wall (s)"))?;
    for r in &report.rows {
        output::line(format!(
            "{:<8} {:>12.3} {:>16.3} {:>10.2}",
            r.mode, r.checkpoint_s, r.checkpoint_s_per_checkpoint, r.wall_s
        ))?;
    }
    let (candidate, base) = (report.rows[1].mode, report.rows[0].mode);
    output::line(format!(
        "{candidate} stalls rank 0's loop {:.1}x less than {base} (wall time {:.2}x)",
        report.stall_ratio, report.wall_ratio
    ))
}
