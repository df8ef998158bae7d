//! `motley bench trainer`: MoT vs dense step time at the same shapes, and tch vs PyTorch eager
//! on the same MoT forward + backward; both ratios measured in one run, the architectures
//! taking turns step by step.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use motley_shards::{Batch, Vocab};
use motley_trainer::config::OptimConfig;
use motley_trainer::model::{Arch, Model, ModelConfig, Prepared, Routing};
use motley_trainer::ops::{OpCount, count_ops};
use motley_trainer::optim::AdamW;
use motley_trainer::tch::{self, Device, Tensor, nn};
use motley_trainer::train::resolve_device;

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  motley bench trainer\n  motley bench trainer --device cuda --d-model 1024 --layers 24 --heads 16 --seq 2048 --batch 4\n  motley bench trainer --no-torch --json"
)]
pub struct Args {
    /// auto, cpu, cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Model width (default: 256 on CPU, 512 on CUDA).
    #[arg(long)]
    d_model: Option<i64>,
    /// Layers (default: 4 on CPU, 8 on CUDA).
    #[arg(long)]
    layers: Option<i64>,
    /// Attention heads (default: 4 on CPU, 8 on CUDA).
    #[arg(long)]
    heads: Option<i64>,
    /// Sequence length (default: 256 on CPU, 2048 on CUDA).
    #[arg(long)]
    seq: Option<usize>,
    /// Rows per batch (default: 4 on CPU, 8 on CUDA).
    #[arg(long)]
    batch: Option<usize>,
    /// Text vocabulary (image 8192 codes and 500 speech units are added, as in the paper).
    #[arg(long, default_value_t = 8192)]
    text_vocab: u32,
    /// Timed steps per measurement (architectures take turns step by step).
    #[arg(long, default_value_t = 9)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Also time MoT with `model.grouped_mm` (each projection as one grouped GEMM).
    #[arg(long)]
    grouped_mm: bool,
    /// Skip the PyTorch baseline.
    #[arg(long)]
    no_torch: bool,
    /// Python with torch (the same libtorch version as motley).
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    #[arg(long, default_value = "scripts/bench/mot_torch.py")]
    script: PathBuf,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    device: String,
    threads: i32,
    shapes: serde_json::Value,
    steps: usize,
    /// What the ratios compare: "wall" (CUDA, synchronized) or "thread-cpu" (CPU with one torch
    /// thread: CPU time of the calling thread, immune to other load on a shared machine).
    clock: &'static str,
    dense_step_ms: f64,
    mot_step_ms: f64,
    /// MoT / dense full step (goal <= 1.10).
    mot_over_dense: f64,
    /// With `--grouped-mm`: MoT full step with grouped GEMMs, and its ratio to dense.
    mot_grouped_step_ms: Option<f64>,
    mot_grouped_over_dense: Option<f64>,
    /// Why the grouped measurement is missing when `--grouped-mm` was asked for.
    mot_grouped_note: Option<String>,
    /// Forward + backward alone (no layout, gradient norm or optimizer), dense and MoT.
    dense_fwd_bwd_ms: f64,
    mot_fwd_bwd_ms: f64,
    /// MoT / dense forward + backward: the model's share of the step ratio (MoT's optimizer
    /// updates about 3x the non-embedding parameters).
    mot_over_dense_fwd_bwd: f64,
    torch_fwd_bwd_ms: Option<f64>,
    /// tch / PyTorch eager, MoT forward + backward (goal <= 1.0).
    tch_over_torch: Option<f64>,
    /// ATen operators one full step dispatches (forward, backward, optimizer; composites and
    /// views included), counted after the timed steps: the host work per step.
    ops_per_step: PerArch,
    /// Of those, the leaves that do work (no views, no composites): about one CUDA kernel
    /// launch each.
    kernels_per_step: PerArch,
    /// MoT / dense, dispatched operators and work-doing ones (how launch-bound the ratio is).
    mot_over_dense_ops: f64,
    mot_over_dense_kernels: f64,
    /// The work-doing operators MoT runs more (negative: fewer) than dense per step, top 10.
    mot_extra_kernels: Vec<(String, i64)>,
    /// Wall-clock milliseconds of the same measurements (dense, MoT, dense fwd+bwd, MoT
    /// fwd+bwd, PyTorch).
    wall_ms: [Option<f64>; 5],
    torch_note: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct PerArch {
    dense: u64,
    mot: u64,
    mot_grouped: Option<u64>,
}

/// A timing in both clocks.
#[derive(Debug, Clone, Copy)]
struct Ms {
    wall: f64,
    cpu: Option<f64>,
}

impl Ms {
    fn pick(self, clock: &str) -> f64 {
        if clock == "wall" { self.wall } else { self.cpu.unwrap_or(self.wall) }
    }
}

/// CPU time of the calling thread in seconds (Linux `/proc/thread-self/schedstat`, ns).
fn thread_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1e9)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// One architecture's model, optimizer and batch, stepped one step at a time so several can
/// be timed in turn.
struct Runner<'a> {
    cfg: &'a ModelConfig,
    batch: &'a Batch,
    device: Device,
    model: Model,
    opt: AdamW,
    /// The batch laid out once, for forward + backward alone (what the PyTorch script times).
    fixed: Prepared,
    wall: Vec<f64>,
    cpu: Option<Vec<f64>>,
    _vs: nn::VarStore,
}

impl<'a> Runner<'a> {
    fn new(cfg: &'a ModelConfig, batch: &'a Batch, device: Device) -> anyhow::Result<Self> {
        let vs = nn::VarStore::new(device);
        let model = Model::new_seeded(&vs.root(), cfg, 0)?;
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let opt = AdamW::new(vars, &OptimConfig::default());
        let fixed = Prepared::new(cfg, batch, Routing::Sorted, device)?;
        Ok(Runner { cfg, batch, device, model, opt, fixed, wall: Vec::new(), cpu: Some(Vec::new()), _vs: vs })
    }

    /// `full` = layout + forward + backward + clip norm + AdamW; otherwise forward + backward
    /// on the batch laid out once.
    fn step(&mut self, full: bool) -> anyhow::Result<()> {
        if full {
            let p = Prepared::new(self.cfg, self.batch, Routing::Sorted, self.device)?;
            self.model.loss(&p).loss.backward();
            let comm = motley_trainer::dist::Comm::single();
            let _norm = self.opt.grad_norm(&comm)?;
            self.opt.step(1e-4, &comm)?;
        } else {
            self.model.loss(&self.fixed).loss.backward();
        }
        Ok(())
    }

    /// One step, timed when `record` (in both clocks), gradients zeroed after it.
    fn timed_step(&mut self, full: bool, record: bool) -> anyhow::Result<()> {
        sync(self.device);
        let t0 = Instant::now();
        let c0 = thread_cpu_s();
        self.step(full)?;
        sync(self.device);
        if record {
            self.wall.push(1000.0 * t0.elapsed().as_secs_f64());
            self.cpu = match (self.cpu.take(), c0, thread_cpu_s()) {
                (Some(mut v), Some(a), Some(b)) => {
                    v.push(1000.0 * (b - a));
                    Some(v)
                }
                _ => None,
            };
        }
        self.opt.zero_grad();
        Ok(())
    }

    /// Median of the recorded steps (the median, not the mean, so a step slowed by other work
    /// on a shared machine does not move the figure); starts a new measurement.
    fn take(&mut self) -> Ms {
        let ms = Ms { wall: median(std::mem::take(&mut self.wall)), cpu: self.cpu.take().map(median) };
        self.cpu = Some(Vec::new());
        ms
    }

    /// The operators of one full step.
    fn count(&mut self) -> anyhow::Result<OpCount> {
        let (done, ops) = count_ops(|| self.step(true))?;
        done?;
        self.opt.zero_grad();
        Ok(ops)
    }
}

/// Times `runners` step by step in turn (A B C A B C ...), `warmup` untimed rounds then `steps`
/// timed ones, so drift on a shared machine (other load, clock speed, cache state) falls on
/// every architecture alike and the ratios stay fair; one median per runner. `after_round(record)`
/// takes its turn at the end of every round (the PyTorch reference).
fn interleaved(
    runners: &mut [Runner],
    warmup: usize,
    steps: usize,
    full: bool,
    mut after_round: impl FnMut(bool),
) -> anyhow::Result<Vec<Ms>> {
    for round in 0..warmup + steps {
        let record = round >= warmup;
        for r in runners.iter_mut() {
            r.timed_step(full, record).with_context(|| format!("{} step", r.cfg.arch))?;
        }
        after_round(record);
    }
    Ok(runners.iter_mut().map(|r| r.take()).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// The PyTorch reference (`scripts/bench/mot_torch.py --serve`) on the same config and batch,
/// kept running so its steps can take turns with ours: one `step` line in, one line of times out.
struct TorchRef {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl TorchRef {
    /// Starts the reference and waits until its model is built; Err says why it is unavailable.
    fn spawn(args: &Args, cfg: &ModelConfig, batch: &Batch, device: Device) -> Result<Self, String> {
        // A bare name (`python3`) is looked up on PATH when run; a path must exist.
        let bare = args.python.components().count() == 1;
        if (!bare && !args.python.exists()) || !args.script.exists() {
            return Err(format!(
                "{} or {} not found (run from the repository root)",
                args.python.display(),
                args.script.display()
            ));
        }
        let spec = serde_json::json!({
            "config": {
                "arch": cfg.arch.to_string(), "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                "ffn_dim": cfg.ffn_dim(), "vocab_size": cfg.vocab_size, "qk_norm": cfg.qk_norm,
            },
            "batch": batch,
        });
        let path = std::env::temp_dir().join(format!("motley-bench-trainer-{}.json", std::process::id()));
        std::fs::write(&path, spec.to_string()).map_err(|e| format!("writing {}: {e}", path.display()))?;
        let dev = if device.is_cuda() { "cuda" } else { "cpu" };
        let child = Command::new(&args.python)
            .arg(&args.script)
            .arg(&path)
            .args(["--device", dev, "--serve"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = child.map_err(|e| format!("running {}: {e}", args.python.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("no pipes to the PyTorch reference".into());
        };
        let mut me = TorchRef { child, stdin, stdout: BufReader::new(stdout), wall: Vec::new(), cpu: Vec::new() };
        let ready = me.read_line();
        let _ = std::fs::remove_file(&path);
        let ready = ready?;
        if ready["ready"].as_bool() != Some(true) {
            return Err(me.failure(format!("unexpected first line {ready}")));
        }
        Ok(me)
    }

    /// The reference's next output line as JSON; on EOF, its stderr says why.
    fn read_line(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err(self.failure("it exited".into())),
            Ok(_) => serde_json::from_str(line.trim()).map_err(|e| format!("reading its output {line:?}: {e}")),
            Err(e) => Err(format!("reading its output: {e}")),
        }
    }

    /// `what`, with the reference's stderr (it has stopped or is stopped now).
    fn failure(&mut self, what: String) -> String {
        let _ = self.child.kill();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = self.child.wait();
        format!("PyTorch reference failed ({what}): {}", err.trim())
    }

    /// One forward + backward there; its times recorded when `record`.
    fn step(&mut self, record: bool) -> Result<(), String> {
        writeln!(self.stdin, "step").and_then(|()| self.stdin.flush()).map_err(|e| self.failure(e.to_string()))?;
        let v = self.read_line()?;
        let (Some(wall), Some(cpu)) = (v["wall_ms"].as_f64(), v["cpu_ms"].as_f64()) else {
            return Err(self.failure(format!("unexpected answer {v}")));
        };
        if record {
            self.wall.push(wall);
            self.cpu.push(cpu);
        }
        Ok(())
    }

    /// Medians of the recorded steps; the process is stopped.
    fn finish(mut self) -> Ms {
        let _ = writeln!(self.stdin, "quit");
        drop(self.stdin);
        let _ = self.child.wait();
        Ms { wall: median(self.wall), cpu: Some(median(self.cpu)) }
    }
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let device = resolve_device(&args.device)?;
    let gpu = device.is_cuda();
    let d = args.d_model.unwrap_or(if gpu { 512 } else { 256 });
    let layers = args.layers.unwrap_or(if gpu { 8 } else { 4 });
    let heads = args.heads.unwrap_or(if gpu { 8 } else { 4 });
    let seq = args.seq.unwrap_or(if gpu { 2048 } else { 256 });
    let bsz = args.batch.unwrap_or(if gpu { 8 } else { 4 });
    let vocab = Vocab::build(args.text_vocab, 8192, 500, None);
    let image_len = (seq / 4).clamp(16, 1026);
    let batch = motley_trainer::data::mixed_batch(&vocab, bsz, seq, image_len, 7);
    let base = ModelConfig {
        vocab_size: i64::from(vocab.total_size),
        d_model: d,
        n_layers: layers,
        n_heads: heads,
        ..ModelConfig::default()
    };
    let mot = ModelConfig { arch: Arch::Mot, ..base.clone() };
    let mot_grouped = ModelConfig { grouped_mm: true, ..mot.clone() };
    let dense = ModelConfig { arch: Arch::Dense, ..base.clone() };
    let dev_name =
        if gpu { "cuda (bf16 compute)".to_string() } else { format!("cpu (fp32, {} threads)", tch::get_num_threads()) };
    eprintln!(
        "device: {dev_name}; d_model {d}, {layers} layers, {heads} heads, seq {seq}, batch {bsz}, vocab {}",
        vocab.total_size
    );
    let mut counts = [0usize; 3];
    for &m in &batch.modality {
        counts[usize::from(m)] += 1;
    }
    eprintln!("tokens per modality (text/image/speech): {counts:?}");

    // On CPU with one torch thread every op runs on this thread, so its CPU time is the cost
    // of the step whatever else the machine is doing; with more threads only wall time is fair.
    let clock = if gpu || tch::get_num_threads() != 1 || thread_cpu_s().is_none() { "wall" } else { "thread-cpu" };
    let mut runners = vec![
        Runner::new(&dense, &batch, device).context("dense model")?,
        Runner::new(&mot, &batch, device).context("MoT model")?,
    ];
    // A device without grouped GEMM is a finding to report, not a reason to lose the rest.
    let grouped_note = if args.grouped_mm {
        match Runner::new(&mot_grouped, &batch, device) {
            Ok(r) => {
                runners.push(r);
                None
            }
            Err(e) => {
                eprintln!("MoT with grouped GEMMs: {e:#}");
                Some(format!("{e:#}"))
            }
        }
    } else {
        None
    };
    let full = interleaved(&mut runners, args.warmup, args.steps, true, |_| {})?;
    let (dense_t, mot_t) = (full[0], full[1]);
    let (dense_ms, mot_ms) = (dense_t.pick(clock), mot_t.pick(clock));
    let grouped_ms = full.get(2).map(|g| g.pick(clock));
    eprintln!("step (layout + fwd + bwd + AdamW), {clock} ms: dense {dense_ms:.2}, MoT {mot_ms:.2}");
    let dense_ops = runners[0].count().context("dense operator count")?;
    let mot_ops = runners[1].count().context("MoT operator count")?;
    let grouped_ops = match runners.get_mut(2) {
        Some(r) => Some(r.count().context("grouped operator count")?),
        None => None,
    };
    eprintln!(
        "operators per step (work-doing): dense {} ({}), MoT {} ({})",
        dense_ops.total, dense_ops.kernels, mot_ops.total, mot_ops.kernels
    );
    if let (Some(g), Some(ops)) = (grouped_ms, &grouped_ops) {
        eprintln!("step, MoT with grouped GEMMs: {g:.2} ms, {} operators ({} work-doing)", ops.total, ops.kernels);
    }
    // Forward + backward alone, dense and MoT, with the PyTorch reference's MoT taking its
    // turn after them in every round (its own process, started now; the grouped model's
    // memory is given back first).
    runners.truncate(2);
    let mut torch = if args.no_torch {
        Err("skipped (--no-torch)".to_string())
    } else {
        TorchRef::spawn(&args, &mot, &batch, device)
    };
    let fwd_bwd = interleaved(&mut runners, args.warmup.max(1), args.steps, false, |record| {
        if let Ok(t) = torch.as_mut()
            && let Err(e) = t.step(record)
        {
            torch = Err(e);
        }
    })?;
    let (dense_fb_t, mot_fb_t) = (fwd_bwd[0], fwd_bwd[1]);
    drop(runners);
    let (dense_fb, mot_fb) = (dense_fb_t.pick(clock), mot_fb_t.pick(clock));
    let (torch_t, note) = match torch {
        Ok(t) => (Some(t.finish()), None),
        Err(why) => (None, Some(why)),
    };
    let torch_ms = torch_t.map(|t| t.pick(clock));
    let report = Report {
        device: dev_name,
        threads: tch::get_num_threads(),
        shapes: serde_json::json!({ "d_model": d, "layers": layers, "heads": heads, "seq": seq, "batch": bsz, "vocab": vocab.total_size }),
        steps: args.steps,
        clock,
        dense_step_ms: dense_ms,
        mot_step_ms: mot_ms,
        mot_over_dense: mot_ms / dense_ms,
        mot_grouped_step_ms: grouped_ms,
        mot_grouped_over_dense: grouped_ms.map(|g| g / dense_ms),
        mot_grouped_note: grouped_note,
        dense_fwd_bwd_ms: dense_fb,
        mot_fwd_bwd_ms: mot_fb,
        mot_over_dense_fwd_bwd: mot_fb / dense_fb,
        torch_fwd_bwd_ms: torch_ms,
        tch_over_torch: torch_ms.map(|t| mot_fb / t),
        ops_per_step: PerArch {
            dense: dense_ops.total,
            mot: mot_ops.total,
            mot_grouped: grouped_ops.as_ref().map(|g| g.total),
        },
        kernels_per_step: PerArch {
            dense: dense_ops.kernels,
            mot: mot_ops.kernels,
            mot_grouped: grouped_ops.as_ref().map(|g| g.kernels),
        },
        mot_over_dense_ops: mot_ops.total as f64 / dense_ops.total as f64,
        mot_over_dense_kernels: mot_ops.kernels as f64 / dense_ops.kernels as f64,
        mot_extra_kernels: mot_ops.extra_kernels_over(&dense_ops).into_iter().take(10).collect(),
        wall_ms: [
            Some(dense_t.wall),
            Some(mot_t.wall),
            Some(dense_fb_t.wall),
            Some(mot_fb_t.wall),
            torch_t.map(|t| t.wall),
        ],
        torch_note: note,
    };
    if ctx.json {
        return output::json(&report);
    }
    output::line(format!("device: {} (ratios from {} time)", report.device, report.clock))?;
    output::line(format!(
        "MoT vs dense, full step: {:.2} ms vs {:.2} ms -> ratio {:.3} (goal <= 1.10)",
        report.mot_step_ms, report.dense_step_ms, report.mot_over_dense
    ))?;
    if let (Some(g), Some(r)) = (report.mot_grouped_step_ms, report.mot_grouped_over_dense) {
        output::line(format!("MoT with grouped GEMMs vs dense, full step: {g:.2} ms -> ratio {r:.3}"))?;
    }
    let (ops, k) = (&report.ops_per_step, &report.kernels_per_step);
    output::line(format!(
        "operators per step: dense {}, MoT {}{} -> ratio {:.3}; work-doing: dense {}, MoT {}{} -> ratio {:.3}",
        ops.dense,
        ops.mot,
        ops.mot_grouped.map(|g| format!(", MoT grouped {g}")).unwrap_or_default(),
        report.mot_over_dense_ops,
        k.dense,
        k.mot,
        k.mot_grouped.map(|g| format!(", MoT grouped {g}")).unwrap_or_default(),
        report.mot_over_dense_kernels
    ))?;
    output::line(format!(
        "MoT vs dense, forward + backward: {:.2} ms vs {:.2} ms -> ratio {:.3}",
        report.mot_fwd_bwd_ms, report.dense_fwd_bwd_ms, report.mot_over_dense_fwd_bwd
    ))?;
    match (report.torch_fwd_bwd_ms, report.tch_over_torch) {
        (Some(t), Some(r)) => output::line(format!(
            "tch vs PyTorch eager, MoT fwd+bwd: {:.2} ms vs {t:.2} ms -> ratio {r:.3} (goal <= 1.0)",
            report.mot_fwd_bwd_ms
        ))?,
        _ => output::line(format!(
            "tch MoT fwd+bwd: {:.2} ms; PyTorch baseline unavailable: {}",
            report.mot_fwd_bwd_ms,
            report.torch_note.clone().unwrap_or_default()
        ))?,
    }
    Ok(())
}
