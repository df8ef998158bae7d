//! `motley train` and `motley eval`: a thin layer over motley-trainer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, bail};
use motley_shards::Split;
use motley_trainer::train::prepare_run_dir;
use motley_trainer::{Arch, TrainConfig, Trainer, compare_mot_dense, evaluate_checkpoint};

use crate::output::{self, Ctx};
use crate::remote_run::{Need, ObjectMirror};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  motley train --preset tiny --data runs/demo/corpus --out runs/tiny-mot\n  motley train --preset tiny --data runs/demo/corpus --arch dense --steps 300 --out runs/tiny-dense\n  motley train --preset tiny --data runs/demo/corpus --compare --out runs/compare\n  motley train --resume runs/tiny-mot --steps 400\n  motley train --preset tiny --data s3://bkt/corpora/web --out s3://bkt/runs/tiny\n  motley train --resume s3://bkt/runs/tiny --steps 400\n  motley train --config my.toml --set model.untie_head=true --set optim.lr=1e-3 --out runs/x\n  motley train --nproc 2 --preset tiny --data runs/demo/corpus --out runs/tiny-dp2\n  torchrun --no-python --nproc-per-node 8 motley train --preset 443m --data /corpus --out runs/443m\n\nData parallel: under torchrun or srun every process is one rank (RANK, WORLD_SIZE, LOCAL_RANK,\nMASTER_ADDR, MASTER_PORT, or SLURM_*); --nproc N starts N local ranks itself. See the README's\n\"Training on a cluster\"."
)]
pub struct Args {
    /// Start from a preset: tiny; the paper's Chameleon sizes 37m, 94m, 443m, 1.5b, 7b; its
    /// Transfusion sizes transfusion-163m, -760m, -1.4b, -7b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// TOML config file ([model], [data], [optim], [train]); applied over the preset.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Shard corpus directory (repeat to mix several; weights via --set data.weights=[..]).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Run directory (config, metrics.jsonl, losses.png, checkpoints/), or an object-store
    /// location (s3://, gs://, az://) the run is copied to as each checkpoint is written.
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
    /// Continue the run in this directory (or object-store location) from its latest
    /// checkpoint.
    #[arg(long, conflicts_with_all = ["config", "compare", "overwrite"])]
    resume: Option<PathBuf>,
    /// Replace an existing run directory.
    #[arg(long)]
    overwrite: bool,
    /// When `--out` already holds a checkpoint, continue from it instead of starting (the same
    /// command then starts or continues a run, as a requeued or restarted job needs). The
    /// command's config must match the run's, but for `[train]` keys and the data paths,
    /// which it changes. Implied when torchrun restarts the ranks (`--max-restarts`).
    #[arg(long, conflicts_with_all = ["resume", "overwrite", "compare"])]
    auto_resume: bool,
    /// Architecture: mot, dense or moe.
    #[arg(long)]
    arch: Option<Arch>,
    /// Optimizer steps in total.
    #[arg(long)]
    steps: Option<u64>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// Override any config key: --set model.d_model=256 --set train.eval_every=50.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Train MoT and dense on the same data and steps (in OUT/mot and OUT/dense) and print
    /// the per-modality comparison.
    #[arg(long)]
    compare: bool,
    /// Print the resolved config and stop.
    #[arg(long)]
    dry_run: bool,
    /// Start N data-parallel ranks on this machine (like `torchrun --standalone
    /// --nproc-per-node N`, N at most 256): the global batch is N × the micro-batch ×
    /// accumulation.
    #[arg(long, value_name = "N")]
    nproc: Option<usize>,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  motley eval --checkpoint runs/tiny-mot --data runs/demo/corpus\n  motley eval --checkpoint runs/tiny-mot/checkpoints/step-00000200 --json"
)]
pub struct EvalArgs {
    /// Run directory (its latest checkpoint) or one checkpoint folder; either may be in an
    /// object store.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Corpus to evaluate on (default: the one the run trained on).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Batches to average over.
    #[arg(long, default_value_t = 16)]
    batches: u64,
    /// Which documents: the held-out split (eval) or the training split (train).
    #[arg(long, default_value = "eval", value_parser = ["eval", "train"])]
    split: String,
    #[arg(long, default_value = "auto")]
    device: String,
}

/// Preset → config file → explicit flags → `--set`, in that order.
fn resolve_config(args: &Args, remote: &motley_remote::RemoteOptions) -> anyhow::Result<TrainConfig> {
    let mut sets = Vec::new();
    if let Some(a) = args.arch {
        sets.push(format!("model.arch=\"{a}\""));
    }
    if let Some(s) = args.steps {
        sets.push(format!("train.steps={s}"));
    }
    if let Some(d) = &args.device {
        sets.push(format!("train.device=\"{d}\""));
    }
    if let Some(s) = args.seed {
        sets.push(format!("train.seed={s}"));
    }
    sets.extend(args.set.iter().cloned());
    let mut cfg = TrainConfig::layered(&args.preset, args.config.as_deref(), &sets)?;
    if !args.data.is_empty() {
        cfg.data.paths = args.data.clone();
        cfg.data.synthetic = false;
    }
    cfg.data.origins = crate::remote::localize(&mut cfg.data.paths, remote)?;
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    // `--nproc 1` too goes through the launcher: one rank in a process group of one, as
    // `torchrun --nproc-per-node 1` runs DDP with one rank.
    if let Some(n) = args.nproc.filter(|&n| n >= 1) {
        // The launcher's own timeout for stragglers: the run's, as the ranks will resolve it.
        let timeout = resolve_config(&args, &ctx.remote)
            .map(|c| c.train.dist_timeout_s)
            .or_else(|_| -> anyhow::Result<f64> {
                let run = args.resume.as_ref().context("no config to read the timeout from")?;
                Ok(motley_trainer::checkpoint::read_meta(&motley_trainer::checkpoint::resolve(run)?)?
                    .config
                    .train
                    .dist_timeout_s)
            })
            .unwrap_or(600.0);
        let argv = crate::launch::strip_nproc(std::env::args_os());
        let code = crate::launch::run_local(n, &argv, std::time::Duration::from_secs_f64(timeout))?;
        if code != 0 {
            std::process::exit(code);
        }
        return Ok(());
    }
    let code = train(args, ctx)?;
    motley_trainer::dist::shutdown()?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// SIGTERM (schedulers, `kill`), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's `--signal=USR1@120`)
/// set the trainer's stop flag: it finishes the step, writes a checkpoint and returns, and the
/// process exits 128 + the signal's number, as one ended by the signal would, so a job script
/// sees that the run did not finish (`--resume` continues it). A second such signal ends the
/// process at once. Returns the flag and the number of the signal that set it.
fn stop_on_signals() -> anyhow::Result<(Arc<AtomicBool>, Arc<AtomicUsize>)> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let stop = Arc::new(AtomicBool::new(false));
    let which = Arc::new(AtomicUsize::new(0));
    for sig in [SIGTERM, SIGINT, SIGUSR1] {
        // Registered first, so it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&stop))?;
        signal_hook::flag::register_usize(sig, Arc::clone(&which), sig as usize)?;
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    Ok((stop, which))
}

/// The exit code of a run that ended: 0, or 128 + the signal that interrupted it (SIGTERM's
/// 143 on a rank that stopped because another rank was signalled).
fn exit_code(summary: &motley_trainer::TrainSummary, which: &AtomicUsize) -> i32 {
    match (summary.interrupted, which.load(Ordering::SeqCst)) {
        (false, _) => 0,
        (true, 0) => 128 + signal_hook::consts::SIGTERM,
        (true, sig) => 128 + sig as i32,
    }
}

/// `--resume RUN` (also where `--auto-resume` finds a checkpoint): the run's saved config with
/// `sets` laid over it; `data` replaces its corpora.
fn resume(run: &Path, data: &[PathBuf], mut sets: Vec<String>, ctx: &Ctx) -> anyhow::Result<i32> {
    let remote = run.to_str().filter(|s| crate::remote::is_remote(Path::new(s)));
    let (mirror, local) = match remote {
        Some(uri) => {
            let (run_uri, local) = crate::remote_run::pull(uri, Need::Resume, &ctx.remote)?;
            (Some(run_uri), local)
        }
        None => (None, run.to_path_buf()),
    };
    let mut corpus_sets = Vec::new();
    if !data.is_empty() {
        let mut data = data.to_vec();
        let origins = crate::remote::localize(&mut data, &ctx.remote)?;
        corpus_sets.extend(crate::remote::data_overrides(&data, &origins));
    } else if let Some((data, origins)) = crate::remote::recorded_corpora(&local, &ctx.remote)? {
        // Corpora from object stores are fetched again into this machine's cache.
        corpus_sets.extend(crate::remote::data_overrides(&data, &origins));
    }
    corpus_sets.append(&mut sets);
    let t = Trainer::resume(&local, &corpus_sets).with_context(|| format!("resuming {}", run.display()))?;
    run_to_end(t, mirror, ctx)
}

/// Runs a started or resumed trainer to its end under the stop signals (copying to `mirror`,
/// a run's object-store location, if any), prints the summary and returns the exit code.
fn run_to_end(mut t: Trainer, mirror: Option<String>, ctx: &Ctx) -> anyhow::Result<i32> {
    if let Some(uri) = mirror {
        t.set_mirror(Box::new(ObjectMirror::new(&uri, ctx.remote.clone())));
    }
    let (stop, which) = stop_on_signals()?;
    t.set_stop_flag(stop);
    let summary = t.run()?;
    report(&summary, t.comm().rank(), ctx)?;
    Ok(exit_code(&summary, &which))
}

/// The run directory a command without `--out` uses.
fn default_out(preset: &str, arch: &str, compare: bool) -> PathBuf {
    PathBuf::from("runs").join(format!("{preset}-{}", if compare { "compare" } else { arch }))
}

/// `--auto-resume`: None when `out` holds no complete checkpoint (the run starts). Otherwise
/// the overrides that turn the run's saved config into this command's: its `[train]` keys
/// that differ. Any other difference (model, optimizer, data but its paths) is an error naming
/// the keys, since the checkpoint cannot continue as that run.
fn auto_resume_sets(fresh: &TrainConfig, out: &Path, ctx: &Ctx) -> anyhow::Result<Option<Vec<String>>> {
    let saved = match out.to_str().filter(|s| crate::remote::is_remote(Path::new(s))) {
        Some(uri) => match crate::remote_run::latest_meta(uri, &ctx.remote)? {
            Some(meta) => meta.config,
            None => return Ok(None),
        },
        None => match motley_trainer::checkpoint::list(out)?.pop() {
            Some((_, ckpt)) => motley_trainer::checkpoint::read_meta(&ckpt)?.config,
            None => return Ok(None),
        },
    };
    let (sets, conflicts) = saved.resume_delta(fresh)?;
    if !conflicts.is_empty() {
        bail!(
            "{}: holds a run this command cannot continue (--auto-resume): {}; fix the command, or pass \
             --overwrite (without --auto-resume) to start over",
            out.display(),
            conflicts.join(", ")
        );
    }
    Ok(Some(sets))
}

/// Prints a finished run's summary (rank 0 only: the other ranks' stdout stays empty).
fn report(summary: &motley_trainer::TrainSummary, rank: usize, ctx: &Ctx) -> anyhow::Result<()> {
    if rank != 0 {
        return Ok(());
    }
    if ctx.json { output::json(summary) } else { output::line(summary.line()) }
}

fn train(args: Args, ctx: &Ctx) -> anyhow::Result<i32> {
    if let Some(run) = &args.resume {
        let mut sets = Vec::new();
        if let Some(s) = args.steps {
            sets.push(format!("train.steps={s}"));
        }
        if let Some(d) = &args.device {
            sets.push(format!("train.device=\"{d}\""));
        }
        sets.extend(args.set.iter().cloned());
        return resume(run, &args.data, sets, ctx);
    }
    let launch = motley_trainer::dist::Launch::from_env()?;
    let cfg = resolve_config(&args, &ctx.remote)?;
    let auto = (args.auto_resume || launch.restart > 0) && !args.compare && !args.dry_run;
    if auto {
        let out = args.out.clone().unwrap_or_else(|| default_out(&cfg.preset, &cfg.model.arch.to_string(), false));
        if let Some(sets) = auto_resume_sets(&cfg, &out, ctx)? {
            if launch.restart > 0 && !args.auto_resume {
                tracing::warn!(
                    "torchrun restarted the ranks (attempt {}): continuing {} from its latest checkpoint",
                    launch.restart,
                    out.display()
                );
            }
            return resume(&out, &args.data, sets, ctx);
        }
    }
    if args.dry_run {
        output::line(cfg.to_toml()?)?;
        return Ok(0);
    }
    let out = args.out.clone().unwrap_or_else(|| default_out(&cfg.preset, &cfg.model.arch.to_string(), args.compare));
    let rank = launch.rank;
    let remote_out = out.to_str().filter(|s| crate::remote::is_remote(Path::new(s))).map(str::to_string);
    if args.compare {
        if let Some(uri) = &remote_out {
            bail!("--compare writes OUT/mot and OUT/dense on this machine: give it a local --out, not {uri}");
        }
        let c = compare_mot_dense(&cfg, &out, args.overwrite, true)?;
        if rank != 0 {
            return Ok(0);
        }
        if ctx.json {
            output::json(&c)?
        } else {
            output::line(c.table())?
        };
        return Ok(0);
    }
    // A run in an object store trains in a local staging folder that rank 0 copies from (and
    // every rank its own files of per-rank checkpoints, so nodes need no shared disk). Under
    // --auto-resume a run without a complete checkpoint (cut off before its first) starts over.
    let overwrite = args.overwrite || auto;
    let local = match &remote_out {
        Some(uri) if rank == 0 => crate::remote_run::prepare_new(uri, overwrite, &ctx.remote)?,
        Some(uri) => crate::remote_run::staging_dir(uri, &ctx.remote),
        None => {
            if rank == 0 {
                prepare_run_dir(&out, overwrite)?;
            }
            out.clone()
        }
    };
    let mut t = Trainer::new(cfg)?;
    t.attach_run_dir(&local)?;
    run_to_end(t, remote_out, ctx)
}

pub fn eval(args: EvalArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let split = if args.split == "train" { Split::Train } else { Split::Eval };
    let checkpoint = crate::remote_run::localize(&args.checkpoint, &ctx.remote)?;
    let mut data = (!args.data.is_empty()).then(|| args.data.clone());
    match data.as_mut() {
        Some(d) => {
            crate::remote::localize(d, &ctx.remote)?;
        }
        None => data = crate::remote::recorded_corpora(&checkpoint, &ctx.remote)?.map(|(paths, _)| paths),
    }
    let (step, r) = evaluate_checkpoint(&checkpoint, data, args.batches, split, &args.device)?;
    if ctx.json {
        let v = serde_json::json!({
            "checkpoint": args.checkpoint,
            "step": step,
            "split": args.split,
            "batches": args.batches,
            "loss": r.loss,
            "text": r.text,
            "image": r.image,
            "speech": r.speech,
            "tokens": { "text": r.tokens[0], "image": r.tokens[1], "speech": r.tokens[2] },
        });
        return output::json(&v);
    }
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    output::line(format!(
        "checkpoint {} (step {step}), {} split, {} batches",
        args.checkpoint.display(),
        args.split,
        args.batches
    ))?;
    output::line(format!("loss {} | text {} | image {} | speech {}", f(r.loss), f(r.text), f(r.image), f(r.speech)))?;
    output::line(format!("target tokens: text {} image {} speech {}", r.tokens[0], r.tokens[1], r.tokens[2]))
}
