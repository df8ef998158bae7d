//! `motley study`: the step-matching study (dense vs MoT, optionally MoE-4x) over one or more
//! seeds; a thin layer over `motley_trainer::study`.

use std::path::PathBuf;

use motley_trainer::study::{StudyOptions, reload_study, run_study};
use motley_trainer::{Arch, TrainConfig};

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  motley study --preset tiny --data runs/demo/corpus --out runs/study\n  \
                  motley study --data runs/study/chameleon/text --data runs/study/chameleon/captions \
                  --data runs/study/chameleon/speech --data runs/study/chameleon/interleaved \
                  --config data/sample/study/mix.toml --seeds 3 --moe --out runs/study/chameleon/runs\n  \
                  motley --json study --set data.synthetic=true --steps 40 --eval-every 5")]
pub struct Args {
    /// Start from a preset (see `motley train --help`).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// TOML config file laid over the preset (e.g. a mix's `[data] weights`).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Shard corpus directory (repeat to mix several; weights from --config or --set data.weights=[..]).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Study directory: seed-<s>/<arch>/ runs, study.json, study.png.
    #[arg(long, short = 'o', default_value = "runs/study")]
    out: PathBuf,
    /// Replace existing runs in the study directory.
    #[arg(long)]
    overwrite: bool,
    /// Optimizer steps of every run (the same for all architectures).
    #[arg(long)]
    steps: Option<u64>,
    /// Held-out evaluation every N steps (default: a twentieth of the steps).
    #[arg(long)]
    eval_every: Option<u64>,
    /// Number of seeds (consecutive from --seed); more than one gives a spread.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// First seed (default: the config's train.seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Also train the MoE-4x baseline (the config's moe_routing; expert choice by default).
    #[arg(long)]
    moe: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Override any config key: --set train.eval_batches=8 --set model.moe_routing=token_choice.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Train nothing: print the table (or JSON) of the study already in --out and redraw its plot.
    #[arg(long)]
    report_only: bool,
}

/// Preset → config file → flags → `--set`, as `motley train` does; then the study's cadence.
fn resolve_config(args: &Args, remote: &motley_remote::RemoteOptions) -> anyhow::Result<TrainConfig> {
    let mut sets = Vec::new();
    if let Some(s) = args.steps {
        sets.push(format!("train.steps={s}"));
    }
    if let Some(d) = &args.device {
        sets.push(format!("train.device=\"{d}\""));
    }
    sets.extend(args.set.iter().cloned());
    let mut cfg = TrainConfig::layered(&args.preset, args.config.as_deref(), &sets)?;
    if !args.data.is_empty() {
        cfg.data.paths = args.data.clone();
        cfg.data.synthetic = false;
    }
    // Object-store corpora (`--data s3://…`) train from their cache folders, as in `motley train`.
    crate::remote::localize(&mut cfg.data.paths, remote)?;
    // A curve needs evaluations along the way; checkpoints only at the end (each run's final
    // model stays for `motley sample` / `motley eval`).
    cfg.train.eval_every = args.eval_every.unwrap_or((cfg.train.steps / 20).max(1));
    cfg.train.checkpoint_every = 0;
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    if args.report_only {
        let report = reload_study(&args.out)?;
        return if ctx.json { output::json(&report) } else { output::line(report.table()) };
    }
    let cfg = resolve_config(&args, &ctx.remote)?;
    anyhow::ensure!(args.seeds >= 1, "--seeds must be at least 1");
    let first = args.seed.unwrap_or(cfg.train.seed);
    let mut archs = vec![Arch::Dense, Arch::Mot];
    if args.moe {
        archs.push(Arch::Moe);
    }
    let opts = StudyOptions {
        seeds: (first..first + args.seeds).collect(),
        archs,
        overwrite: args.overwrite,
        // Progress (every run's console lines) goes to stderr either way.
        verbose: true,
    };
    let report = run_study(&cfg, &args.out, &opts)?;
    if ctx.json { output::json(&report) } else { output::line(report.table()) }
}
