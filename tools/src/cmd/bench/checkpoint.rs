//! `motley bench checkpoint`: how long training stalls for its checkpoints, written on the
//! loop's thread (the baseline) against `train.checkpoint_async` (a host copy, then written in
//! the background), the same run twice in one process: seconds in checkpointing, and the
//! whole run's wall time.

use motley_trainer::{TrainConfig, Trainer};

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  motley bench checkpoint\n  motley bench checkpoint --preset 94m --steps 12 --every 4 --json"
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
    /// Checkpointing stall, synchronous ÷ async (how many times less the loop waits).
    stall_ratio: f64,
    /// Wall time of the run, synchronous ÷ async.
    wall_ratio: f64,
}

fn one_run(args: &Args, asynchronous: bool, dir: &std::path::Path) -> anyhow::Result<(Row, i64)> {
    let sets: Vec<String> = [
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
        format!("train.checkpoint_async={asynchronous}"),
    ]
    .into();
    let cfg = TrainConfig::layered(&args.preset, None, &sets)?;
    let run = dir.join(if asynchronous { "async" } else { "sync" });
    motley_trainer::train::prepare_run_dir(&run, true)?;
    let mut t = Trainer::new(cfg)?;
    t.verbose = false;
    t.attach_run_dir(&run)?;
    let s = t.run()?;
    let last = motley_trainer::checkpoint::resolve(&run)?;
    let bytes = std::fs::read_dir(&last)?.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    let checkpoints = args.steps / args.every.max(1) + u64::from(!args.steps.is_multiple_of(args.every.max(1)));
    let row = Row {
        mode: if asynchronous { "async" } else { "sync" },
        steps: s.steps,
        checkpoints,
        checkpoint_bytes: bytes,
        wall_s: s.wall_s,
        checkpoint_s: s.checkpoint_s,
        checkpoint_s_per_checkpoint: s.checkpoint_s / checkpoints.max(1) as f64,
    };
    Ok((row, s.params))
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
        for (i, asynchronous) in [false, true].into_iter().enumerate() {
            let (row, p) = one_run(&args, asynchronous, tmp.path())?;
            params = p;
            if best[i].as_ref().is_none_or(|b| row.checkpoint_s < b.checkpoint_s) {
                best[i] = Some(row);
            }
        }
    }
    let [Some(sync), Some(asynchronous)] = best else { anyhow::bail!("no run finished") };
    let report = Report {
        preset: args.preset.clone(),
        params,
        stall_ratio: sync.checkpoint_s / asynchronous.checkpoint_s.max(1e-9),
        wall_ratio: sync.wall_s / asynchronous.wall_s.max(1e-9),
        rows: vec![sync, asynchronous],
    };
    if ctx.json {
        return output::json(&report);
    }
    output::line(format!(
        "{} ({:.1} M parameters), {} steps, a checkpoint every {} ({:.0} MB each), fastest of {}:",
        report.preset,
        report.params as f64 / 1e6,
        args.steps,
        args.every,
        report.rows[0].checkpoint_bytes as f64 / 1e6,
        args.repeat
    ))?;
    output::line(format!("{:<6} {:>12} {:>16} {:>10}", "mode", "stall (s)", "per checkpoint", "wall (s)"))?;
    for r in &report.rows {
        output::line(format!(
            "{:<6} {:>12.3} {:>16.3} {:>10.2}",
            r.mode, r.checkpoint_s, r.checkpoint_s_per_checkpoint, r.wall_s
        ))?;
    }
    output::line(format!("async stalls the loop {:.1}x less (wall time {:.2}x)", report.stall_ratio, report.wall_ratio))
}
