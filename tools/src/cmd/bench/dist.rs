//! `motley bench dist`: data-parallel communication and scaling, every figure against a
//! baseline measured in the same run. Collectives of the c10d process group (all-reduce,
//! reduce-scatter, all-gather; bus bandwidth as nccl-tests defines it) against a memcpy of the
//! same bytes in the same processes; training step time at 1 and N ranks (each rank the same
//! micro-batch) with the share of a step spent waiting on communication; and N ranks with
//! every rank using all cores (oversubscribed OpenMP) against the default division; and the
//! cost of memory savings at N ranks, in turns at the same shapes: activation checkpointing
//! against plain data parallel, ZeRO-3 (which needs checkpointing) against both, with the
//! bytes each holds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use motley_trainer::dist::{Backend, Comm, Launch, ReduceOp};
use motley_trainer::tch::{Device, Kind, Tensor};
use serde::{Deserialize, Serialize};

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  motley bench dist\n  motley bench dist --nproc 4 --sizes 1,16,256 --json\n\nOn a 2-core machine absolute times are noise; the ratios are measured interleaved in one run."
)]
pub struct Args {
    /// Ranks (processes) on this machine.
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// Message sizes in MiB for the collectives.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    sizes: Vec<f64>,
    /// Timed repetitions per collective and size (median reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Training steps per run (the first 2 are warm-up).
    #[arg(long, default_value_t = 12)]
    steps: u64,
    /// Runs of each training configuration, taken in turns.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Skip the training runs (collectives only).
    #[arg(long)]
    no_train: bool,
}

/// The part one group of ranks measures (`motley bench dist-worker`, started by `bench dist`).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<f64>,
    #[arg(long)]
    iters: usize,
    /// Where rank 0 writes its results (JSON).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CollectiveRow {
    mib: f64,
    /// Median seconds per call.
    all_reduce_s: f64,
    reduce_scatter_s: f64,
    all_gather_s: f64,
    memcpy_s: f64,
    /// Bus bandwidth, GB/s (all-reduce: bytes × 2(n−1)/n per second).
    all_reduce_bus_gbs: f64,
    reduce_scatter_bus_gbs: f64,
    all_gather_bus_gbs: f64,
    memcpy_gbs: f64,
    /// All-reduce bus bandwidth over memcpy bandwidth.
    all_reduce_over_memcpy: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkerReport {
    world: usize,
    backend: String,
    rows: Vec<CollectiveRow>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// One rank of the collective measurements.
pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let launch = Launch::from_env()?;
    let comm = Comm::for_process(launch, Backend::Gloo, Device::Cpu, Duration::from_secs(300))?;
    let group = comm.group().context("bench dist-worker runs under a launcher of at least 2 ranks")?;
    let w = comm.world();
    let mut rows = Vec::new();
    for &mib in &args.sizes {
        let n = ((mib * 1024.0 * 1024.0 / 4.0) as i64 / w as i64).max(1) * w as i64;
        let bytes = (n * 4) as f64;
        let x = Tensor::ones([n], (Kind::Float, Device::Cpu));
        let out = Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let chunk = Tensor::zeros([n / w as i64], (Kind::Float, Device::Cpu));
        let mut times: [Vec<f64>; 4] = Default::default();
        for i in 0..=args.iters {
            // Turns, so drift on a shared machine falls on all four alike; iteration 0 warms up.
            comm.barrier()?;
            let t = Instant::now();
            group.all_reduce(&x, ReduceOp::Sum)?.wait()?;
            let ar = t.elapsed().as_secs_f64();
            comm.barrier()?;
            let t = Instant::now();
            group.reduce_scatter_into(&chunk, &x, ReduceOp::Sum)?.wait()?;
            let rs = t.elapsed().as_secs_f64();
            comm.barrier()?;
            let t = Instant::now();
            group.all_gather_into(&out, &chunk)?.wait()?;
            let ag = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut dst = out.shallow_clone();
            dst.copy_(&x);
            let cp = t.elapsed().as_secs_f64();
            if i > 0 {
                for (v, s) in times.iter_mut().zip([ar, rs, ag, cp]) {
                    v.push(s);
                }
            }
        }
        let [mut ar, mut rs, mut ag, mut cp] = times;
        let (ar, rs, ag, cp) = (median(&mut ar), median(&mut rs), median(&mut ag), median(&mut cp));
        let f = (w as f64 - 1.0) / w as f64;
        let gbs = |factor: f64, s: f64| bytes * factor / s / 1e9;
        rows.push(CollectiveRow {
            mib,
            all_reduce_s: ar,
            reduce_scatter_s: rs,
            all_gather_s: ag,
            memcpy_s: cp,
            all_reduce_bus_gbs: gbs(2.0 * f, ar),
            reduce_scatter_bus_gbs: gbs(f, rs),
            all_gather_bus_gbs: gbs(f, ag),
            memcpy_gbs: gbs(1.0, cp),
            all_reduce_over_memcpy: gbs(2.0 * f, ar) / gbs(1.0, cp),
        });
    }
    if comm.rank() == 0 {
        let report = WorkerReport { world: w, backend: comm.backend_name().into(), rows };
        std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", args.out.display()))?;
    }
    motley_trainer::dist::shutdown()?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
struct StepRun {
    label: String,
    ranks: usize,
    threads_per_rank: String,
    /// Median seconds per optimizer step (steps after the first two).
    step_s: f64,
    tokens_per_s: f64,
    /// Median share of a step spent waiting on communication after backward.
    comm_share: Option<f64>,
    /// Rank 0's weights + gradients + moments between steps, and the most its second step
    /// allocated on top (activations, loss, ZeRO-3's gathered weights).
    state_bytes: Option<u64>,
    step_peak_bytes: Option<u64>,
}

/// One training run: `group` ranks under the launcher (None: one plain process).
fn train_run(
    dir: &Path,
    group: Option<usize>,
    threads: Option<usize>,
    steps: u64,
    extra: &[&str],
) -> anyhow::Result<StepRun> {
    let exe = std::env::current_exe()?;
    let ranks = group.unwrap_or(1);
    let run = dir.join(format!(
        "r{}-t{}-{}",
        group.map_or("plain".into(), |n| n.to_string()),
        threads.map_or("auto".into(), |t| t.to_string()),
        extra.join("-").replace(['=', '.'], "_")
    ));
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--json", "train", "--preset", "tiny", "--overwrite", "--out"]).arg(&run);
    for s in extra {
        cmd.args(["--set", s]);
    }
    if let Some(n) = group {
        cmd.args(["--nproc", &n.to_string()]);
    }
    for s in [
        "data.synthetic=true".to_string(),
        format!("train.steps={steps}"),
        "train.eval_every=0".into(),
        "train.checkpoint_every=0".into(),
        "train.log_every=1".into(),
        "train.device=\"cpu\"".into(),
        format!("train.threads={}", threads.unwrap_or(0)),
    ] {
        cmd.args(["--set", &s]);
    }
    for v in ["OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
        cmd.env_remove(v);
    }
    let out = cmd.env("RUST_LOG", "warn").output().context("starting motley train")?;
    anyhow::ensure!(out.status.success(), "motley train ({ranks} ranks): {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let b = &summary["state_bytes"];
    let state_bytes = ["weights", "gradients", "moments"].iter().map(|k| b[*k].as_u64()).sum::<Option<u64>>();
    let text = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    let (mut secs, mut tps, mut share) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let r: serde_json::Value = serde_json::from_str(line)?;
        if r["step"].as_u64().unwrap_or(0) <= 2 {
            continue;
        }
        let (tok, rate) = (r["tokens"].as_f64().unwrap_or(0.0), r["tokens_per_s"].as_f64().unwrap_or(0.0));
        if rate > 0.0 {
            let s = tok / rate;
            secs.push(s);
            tps.push(rate);
            if let Some(c) = r["comm_s"].as_f64() {
                share.push(c / s);
            }
        }
    }
    Ok(StepRun {
        label: String::new(),
        ranks,
        threads_per_rank: threads.map_or("cores / local ranks".into(), |t| t.to_string()),
        step_s: median(&mut secs),
        tokens_per_s: median(&mut tps),
        comm_share: (!share.is_empty()).then(|| median(&mut share)),
        state_bytes,
        step_peak_bytes: summary["step_peak_bytes"].as_u64(),
    })
}

#[derive(Debug, Serialize)]
struct Report {
    collectives: WorkerReport,
    training: Vec<StepRun>,
    /// Step time of N ranks over 1 rank, each with the same micro-batch (1.0 = perfect weak
    /// scaling; on a machine with fewer free cores than ranks, the cores are the limit).
    nproc_over_one: Option<f64>,
    /// One rank in a process group of one (every collective run) over one plain process: the
    /// data-parallel machinery's own overhead.
    group_of_one_over_plain: Option<f64>,
    /// N ranks each using every core over N ranks dividing the cores (the default).
    oversubscribed_over_divided: Option<f64>,
    /// Step time at N ranks: activation checkpointing over plain data parallel, ZeRO-3 (with
    /// checkpointing) over checkpointing alone and over plain data parallel.
    checkpointing_over_plain: Option<f64>,
    zero3_over_checkpointing: Option<f64>,
    zero3_over_plain: Option<f64>,
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    anyhow::ensure!(args.nproc >= 2, "--nproc must be at least 2");
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("collectives.json");
    let sizes: Vec<String> = args.sizes.iter().map(|s| s.to_string()).collect();
    let argv: Vec<std::ffi::OsString> = ["motley", "bench", "dist-worker", "--sizes", &sizes.join(","), "--iters"]
        .iter()
        .map(Into::into)
        .chain([args.iters.to_string().into(), "--out".into(), out.clone().into_os_string()])
        .collect();
    eprintln!("bench dist: collectives on {} ranks, {:?} MiB", args.nproc, args.sizes);
    let code = crate::launch::run_local(args.nproc, &argv, Duration::from_secs(300))?;
    anyhow::ensure!(code == 0, "the collective benchmark's ranks failed (exit {code})");
    let collectives: WorkerReport = serde_json::from_slice(&std::fs::read(&out)?)?;
    let mut training: Vec<StepRun> = Vec::new();
    let (mut one, mut many, mut over, mut group_one) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ck, mut z3, mut z3_ck) = (Vec::new(), Vec::new(), Vec::new());
    if !args.no_train {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let per_rank = (cores / args.nproc).max(1);
        for rep in 0..args.repeats {
            eprintln!("bench dist: training runs, round {} of {}", rep + 1, args.repeats);
            let mut a = train_run(dir.path(), None, Some(per_rank), args.steps, &[])?;
            a.label = "1 process".into();
            let mut g = train_run(dir.path(), Some(1), Some(per_rank), args.steps, &[])?;
            g.label = "1 rank, group of one".into();
            let mut b = train_run(dir.path(), Some(args.nproc), None, args.steps, &[])?;
            b.label = format!("{} ranks", args.nproc);
            let mut c = train_run(dir.path(), Some(args.nproc), Some(cores), args.steps, &[])?;
            c.label = format!("{} ranks, all cores each", args.nproc);
            let ckpt = "train.activation_checkpointing=true";
            let mut d = train_run(dir.path(), Some(args.nproc), None, args.steps, &[ckpt])?;
            d.label = format!("{} ranks, checkpointing", args.nproc);
            let mut e = train_run(dir.path(), Some(args.nproc), None, args.steps, &[ckpt, "train.zero=3"])?;
            e.label = format!("{} ranks, ZeRO-3", args.nproc);
            one.push(a.step_s);
            group_one.push(g.step_s / a.step_s);
            many.push(b.step_s);
            over.push(c.step_s / b.step_s);
            ck.push(d.step_s / b.step_s);
            z3_ck.push(e.step_s / d.step_s);
            z3.push(e.step_s / b.step_s);
            training.extend([a, g, b, c, d, e]);
        }
    }
    let ratio = |a: &mut Vec<f64>, b: &mut Vec<f64>| (!a.is_empty()).then(|| median(a) / median(b));
    let report = Report {
        nproc_over_one: ratio(&mut many, &mut one),
        group_of_one_over_plain: (!group_one.is_empty()).then(|| median(&mut group_one)),
        oversubscribed_over_divided: (!over.is_empty()).then(|| median(&mut over)),
        checkpointing_over_plain: (!ck.is_empty()).then(|| median(&mut ck)),
        zero3_over_checkpointing: (!z3_ck.is_empty()).then(|| median(&mut z3_ck)),
        zero3_over_plain: (!z3.is_empty()).then(|| median(&mut z3)),
        collectives,
        training,
    };
    if ctx.json {
        return output::json(&report);
    }
    let c = &report.collectives;
    output::line(format!(
        "collectives: {} ranks, {} (bus bandwidth, GB/s; median of {})",
        c.world, c.backend, args.iters
    ))?;
    output::line(format!(
        "{:>8} {:>12} {:>12} {:>12} {:>10} {:>14}",
        "MiB", "all-reduce", "reduce-scat", "all-gather", "memcpy", "AR / memcpy"
    ))?;
    for r in &c.rows {
        output::line(format!(
            "{:>8} {:>12.2} {:>12.2} {:>12.2} {:>10.2} {:>14.3}",
            r.mib,
            r.all_reduce_bus_gbs,
            r.reduce_scatter_bus_gbs,
            r.all_gather_bus_gbs,
            r.memcpy_gbs,
            r.all_reduce_over_memcpy
        ))?;
    }
    for t in &report.training {
        output::line(format!(
            "{:<28} step {:.3}s  {:>9.0} tokens/s  communication {:<16} held {} + step {}",
            t.label,
            t.step_s,
            t.tokens_per_s,
            t.comm_share.map_or("-".into(), |s| format!("{:.1}% of a step", s * 100.0)),
            t.state_bytes.map_or("-".into(), |b| format!("{:.1} MB", b as f64 / 1e6)),
            t.step_peak_bytes.map_or("-".into(), |b| format!("{:.1} MB", b as f64 / 1e6)),
        ))?;
    }
    if let Some(r) = report.nproc_over_one {
        output::line(format!("step time {} ranks / 1 rank (same micro-batch per rank): {r:.3}", args.nproc))?;
    }
    if let Some(r) = report.group_of_one_over_plain {
        output::line(format!("one rank in a process group of one / one plain process: {r:.3}"))?;
    }
    if let Some(r) = report.oversubscribed_over_divided {
        output::line(format!("all cores per rank / cores divided among ranks: {r:.2}x the step time"))?;
    }
    if let (Some(a), Some(b), Some(c)) =
        (report.checkpointing_over_plain, report.zero3_over_checkpointing, report.zero3_over_plain)
    {
        output::line(format!(
            "step time at {} ranks: checkpointing / plain {a:.3}, ZeRO-3 / checkpointing {b:.3}, ZeRO-3 / plain {c:.3}",
            args.nproc
        ))?;
    }
    Ok(())
}
