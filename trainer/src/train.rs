//! The training loop: one optimizer step at a time, held-out evaluation, checkpoints,
//! exact resume, and the MoT-vs-dense comparison the demo runs.
//!
//! A step: take `grad_accum` micro-batches, back-propagate each one's share of the mean
//! next-token loss (weighted by loss-bearing tokens, so accumulation equals one big batch),
//! check the loss is finite, average gradients over ranks, clip, AdamW with warmup + cosine.
//! With latent images (Transfusion setting) each micro-batch's images are noised from a stream
//! keyed by (seed, step, micro-batch) and the objective adds λ times the diffusion loss, whose
//! share is weighted by images.

use std::path::{Path, PathBuf};
use std::time::Instant;

use motley_shards::{Modality, Split};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::checkpoint::{self, META_VERSION, Meta, RngState};
use crate::config::{OnNonFinite, TrainConfig};
use crate::data::BatchSource;
use crate::diffusion::{self, BUCKETS, NoisePolicy, Schedule};
use crate::dist::{self, GradReducer};
use crate::error::TrainError;
use crate::loader::open_source;
use crate::metrics::{EvalRecord, MODALITY_NAMES, MetricsLog, PerModality, StepRecord};
use crate::model::{Arch, Model, Prepared};
use crate::optim::{AdamW, learning_rate};

/// `auto` (CUDA when available), `cpu`, `cuda`, `cuda:N`.
pub fn resolve_device(spec: &str) -> Result<Device, TrainError> {
    let bad = |msg: String| TrainError::Config { path: "train.device".into(), msg };
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !tch::Cuda::is_available() {
                return Err(bad(format!("`{s}` requested but CUDA is not available")));
            }
            let idx = s
                .strip_prefix("cuda:")
                .map(|i| i.parse::<usize>().map_err(|_| bad(format!("bad device `{s}`"))))
                .transpose()?;
            Ok(Device::Cuda(idx.unwrap_or(0)))
        }
        other => Err(bad(format!("unknown device `{other}` (auto, cpu, cuda, cuda:N)"))),
    }
}

/// Refuses to reuse a non-empty run directory unless `overwrite` (then empties it).
pub fn prepare_run_dir(dir: &Path, overwrite: bool) -> Result<(), TrainError> {
    let non_empty = dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true);
    if non_empty {
        if !overwrite {
            return Err(TrainError::RunDir {
                path: dir.to_path_buf(),
                msg: "already exists; pass --resume to continue it or --overwrite to start over".into(),
            });
        }
        std::fs::remove_dir_all(dir).map_err(TrainError::io("clear run dir", dir))?;
    }
    std::fs::create_dir_all(dir).map_err(TrainError::io("create run dir", dir))
}

/// A model, its optimizer and its data, stepping forward.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub device: Device,
    vs: nn::VarStore,
    pub model: Model,
    opt: AdamW,
    data: Box<dyn BatchSource>,
    reducer: Box<dyn GradReducer>,
    /// The diffusion noise schedule (used when batches carry latent images).
    schedule: Schedule,
    /// Optimizer steps completed.
    pub step: u64,
    skipped: u64,
    skipped_in_a_row: u64,
    tokens: u64,
    run_dir: Option<PathBuf>,
    log: Option<MetricsLog>,
    /// Print a console line every `log_every` steps.
    pub verbose: bool,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("arch", &self.cfg.model.arch)
            .field("step", &self.step)
            .field("device", &self.device)
            .finish()
    }
}

impl Trainer {
    /// Builds a fresh model from `cfg` (seeded), opens its data and resolves the vocabulary.
    pub fn new(cfg: TrainConfig) -> Result<Self, TrainError> {
        let mut cfg = cfg;
        cfg.validate()?;
        if cfg.train.threads > 0 {
            tch::set_num_threads(cfg.train.threads);
        }
        let device = resolve_device(&cfg.train.device)?;
        let reducer = dist::reducer_from_env()?;
        let data = open_source(&cfg.data, cfg.train.seed, Split::Train, reducer.rank(), reducer.world_size())?
            .ok_or_else(|| TrainError::Data { path: "data".into(), msg: "no training split".into() })?;
        let total = i64::from(data.vocab().total_size);
        if cfg.model.vocab_size == 0 {
            cfg.model.vocab_size = total;
        } else if cfg.model.vocab_size < total {
            return Err(TrainError::Config {
                path: "model.vocab_size".into(),
                msg: format!("{} is smaller than the corpus vocabulary ({total})", cfg.model.vocab_size),
            });
        }
        let latent = data.vocab().modality(Modality::Image).and_then(|m| m.latent_dim).map_or(0, i64::from);
        if cfg.model.latent_dim == 0 {
            cfg.model.latent_dim = latent;
        } else if latent > 0 && cfg.model.latent_dim != latent {
            return Err(TrainError::Config {
                path: "model.latent_dim".into(),
                msg: format!("{} differs from the corpus's image latent_dim ({latent})", cfg.model.latent_dim),
            });
        }
        if cfg.model.latent_dim > 0 && cfg.model.latent_scale == 0.0 {
            cfg.model.latent_scale = measure_latent_scale(&cfg, reducer.world_size())?;
            tracing::info!("latent_scale = {} (1 / RMS of the corpus's latents)", cfg.model.latent_scale);
        }
        let schedule = Schedule::cosine(cfg.model.diffusion_steps as usize);
        let vs = nn::VarStore::new(device);
        let model = Model::new_seeded(&vs.root(), &cfg.model, cfg.train.seed as i64)?;
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let opt = AdamW::new(vars, &cfg.optim);
        Ok(Trainer {
            cfg,
            device,
            vs,
            model,
            opt,
            data,
            reducer,
            schedule,
            step: 0,
            skipped: 0,
            skipped_in_a_row: 0,
            tokens: 0,
            run_dir: None,
            log: None,
            verbose: true,
        })
    }

    /// Continues the run in `run` (or from a checkpoint folder) exactly where its latest
    /// checkpoint left it. `overrides` may change the loop (`train.steps`, cadence, device)
    /// and the corpus location, nothing that would change the model or its data stream.
    pub fn resume(run: &Path, overrides: &[String]) -> Result<Self, TrainError> {
        let ckpt = checkpoint::resolve(run)?;
        let meta = checkpoint::read_meta(&ckpt)?;
        let saved = meta.config.clone();
        let cfg = saved.apply_overrides(overrides)?;
        let frozen_ok = cfg.model == saved.model
            && cfg.optim == saved.optim
            && cfg.train.seed == saved.train.seed
            && cfg.train.routing == saved.train.routing
            && DataShape::of(&cfg) == DataShape::of(&saved);
        if !frozen_ok {
            return Err(TrainError::Config {
                path: "--resume".into(),
                msg: "overrides may only change train.steps / cadence / device and data.paths on resume".into(),
            });
        }
        let mut t = Trainer::new(cfg)?;
        checkpoint::load_weights(&t.vs, &ckpt)?;
        let opt_tensors = checkpoint::read_tensors(&ckpt.join(checkpoint::OPTIMIZER_FILE))?;
        t.opt.load_state(&opt_tensors, &meta.optimizer_steps, &ckpt.join(checkpoint::OPTIMIZER_FILE))?;
        t.data.restore(&meta.loader_state)?;
        t.step = meta.step;
        t.skipped = meta.skipped;
        t.skipped_in_a_row = meta.skipped_in_a_row;
        t.tokens = meta.tokens;
        // The run directory is the checkpoint's grandparent (RUN/checkpoints/step-N).
        if let Some(run_dir) = ckpt.parent().and_then(Path::parent) {
            t.attach_run_dir(run_dir)?;
        }
        Ok(t)
    }

    /// Writes the resolved config into `dir` and appends metrics there from now on.
    pub fn attach_run_dir(&mut self, dir: &Path) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(TrainError::io("create run dir", dir))?;
        if self.reducer.rank() == 0 {
            checkpoint::write_atomic(&dir.join("config.toml"), self.cfg.to_toml()?.as_bytes())?;
            self.log = Some(MetricsLog::open(dir, self.step)?);
        }
        self.run_dir = Some(dir.to_path_buf());
        Ok(())
    }

    pub fn run_dir(&self) -> Option<&Path> {
        self.run_dir.as_deref()
    }

    /// Step records logged so far (empty without a run directory).
    pub fn records(&self) -> &[StepRecord] {
        self.log.as_ref().map_or(&[], |l| l.records.as_slice())
    }

    pub fn param_count(&self) -> i64 {
        self.vs.variables().values().map(|t| t.numel() as i64).sum()
    }

    /// One optimizer step (several micro-batches under gradient accumulation).
    pub fn train_step(&mut self) -> Result<StepRecord, TrainError> {
        let started = Instant::now();
        let step = self.step + 1;
        let routing = self.cfg.train.routing;
        // Lay out all micro-batches first: their loss-token counts weight the accumulation.
        let mut micro = Vec::with_capacity(self.cfg.optim.grad_accum as usize);
        let mut tokens = 0u64;
        let policy = noise_policy(&self.model.cfg);
        for i in 0..self.cfg.optim.grad_accum {
            let batch = self.data.next_batch()?;
            tokens += batch.numel() as u64;
            let mut p = Prepared::new(&self.model.cfg, &batch, routing, self.device)?;
            diffusion::noise_prepared(
                &mut p,
                &self.schedule,
                policy,
                &mut diffusion::noise_rng(self.cfg.train.seed, step, i),
            );
            micro.push(p);
        }
        let mut counts = [0i64; Modality::COUNT];
        let mut images = 0usize;
        for p in &micro {
            for (c, n) in counts.iter_mut().zip(p.loss_tokens) {
                *c += n;
            }
            images += p.latent.as_ref().map_or(0, |l| l.n_images());
        }
        let total: i64 = counts.iter().sum::<i64>().max(1);
        let lambda = self.model.cfg.diffusion_lambda;
        let mut loss_acc = Tensor::zeros([], (Kind::Float, self.device));
        let mut sums_acc = Tensor::zeros([Modality::COUNT as i64], (Kind::Float, self.device));
        // Diffusion: [sum over images, sum per timestep bucket] and the matching image counts.
        let mut diff_acc = Tensor::zeros([1 + BUCKETS as i64], (Kind::Float, self.device));
        let mut diff_counts = [0f64; 1 + BUCKETS];
        for p in &micro {
            let out = self.model.loss(p);
            let share = p.loss_tokens.iter().sum::<i64>() as f64 / total as f64;
            let mut scaled = out.lm_loss * share;
            if let (Some(d), Some(per_image), Some(lat)) = (&out.diffusion_loss, &out.image_diffusion, &p.latent) {
                scaled += d * (lambda * lat.n_images() as f64 / images.max(1) as f64);
                let (idx, src) = bucket_index(&self.schedule, &lat.timesteps, per_image, &mut diff_counts);
                diff_acc = diff_acc.index_add(0, &idx, &src);
            }
            scaled.backward();
            loss_acc += scaled.detach();
            sums_acc += out.per_modality_sum;
        }
        // One device → host read per step: the loss, for the finiteness check and the log.
        // Layout: [loss, per-modality sums (3), diffusion sums (1 + BUCKETS)].
        let mut host: Vec<f64> =
            Vec::<f64>::try_from(Tensor::cat(&[loss_acc.view([1]), sums_acc, diff_acc], 0).to_kind(Kind::Double))
                .map_err(TrainError::torch("read loss"))?;
        let sums_len = host.len();
        let mut reduce = host.clone();
        reduce.extend(counts.iter().map(|&c| c as f64));
        reduce.extend(diff_counts);
        self.reducer.all_reduce_sum(&mut reduce)?;
        let world = self.reducer.world_size() as f64;
        host[0] = reduce[0] / world;
        let mean = |sum: usize, count: usize| (reduce[count] > 0.0).then(|| reduce[sum] / reduce[count]);
        let per_modality: PerModality = std::array::from_fn(|m| mean(1 + m, sums_len + m));
        let d0 = 1 + Modality::COUNT;
        let loss_diffusion = mean(d0, sums_len + Modality::COUNT);
        let diffusion_buckets: Vec<Option<f64>> = if loss_diffusion.is_some() {
            (1..=BUCKETS).map(|k| mean(d0 + k, sums_len + Modality::COUNT + k)).collect()
        } else {
            Vec::new()
        };
        let loss = host[0];
        let lr = learning_rate(&self.cfg.optim, step, self.cfg.train.steps);
        let mut record = StepRecord {
            step,
            loss: Some(loss).filter(|l| l.is_finite()),
            loss_text: per_modality[0].filter(|l| l.is_finite()),
            loss_image: per_modality[1].filter(|l| l.is_finite()),
            loss_speech: per_modality[2].filter(|l| l.is_finite()),
            lr,
            grad_norm: 0.0,
            tokens,
            tokens_per_s: 0.0,
            mfu: None,
            skipped: false,
            eval: None,
            loss_diffusion,
            diffusion_buckets,
        };
        let detail = || {
            MODALITY_NAMES
                .iter()
                .zip(per_modality)
                .map(|(n, v)| format!("{n}={}", v.map_or("-".to_string(), |v| format!("{v}"))))
                .chain(loss_diffusion.map(|d| format!("diffusion={d}")))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if !loss.is_finite() {
            self.non_finite("loss", step, format!("loss={loss} ({})", detail()))?;
            record.skipped = true;
        } else {
            let mut grads = self.opt.grads();
            self.reducer.all_reduce_mean(&mut grads)?;
            let norm = self.opt.grad_norm();
            record.grad_norm = norm;
            if !norm.is_finite() {
                self.non_finite("gradient norm", step, format!("grad_norm={norm}, loss={loss} ({})", detail()))?;
                record.skipped = true;
            } else {
                let clip = self.cfg.optim.grad_clip;
                if clip > 0.0 && norm > clip {
                    self.opt.scale_grads(clip / (norm + 1e-6));
                }
                self.opt.step(lr);
                self.skipped_in_a_row = 0;
            }
        }
        self.opt.zero_grad();
        self.step = step;
        self.tokens += tokens;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        record.tokens_per_s = tokens as f64 / secs;
        if self.device.is_cuda() && self.cfg.train.peak_tflops > 0.0 {
            let flops = self.model.cfg.flops_per_token(self.cfg.data.seq_len as i64) * record.tokens_per_s;
            record.mfu = Some(flops / (self.cfg.train.peak_tflops * 1e12));
        }
        Ok(record)
    }

    /// Drops the step's gradients; stops or counts according to `on_nonfinite`.
    fn non_finite(&mut self, what: &'static str, step: u64, detail: String) -> Result<(), TrainError> {
        self.opt.zero_grad();
        match self.cfg.train.on_nonfinite {
            OnNonFinite::Stop => Err(TrainError::NonFinite { what, step, detail }),
            OnNonFinite::Skip => {
                self.skipped += 1;
                self.skipped_in_a_row += 1;
                tracing::warn!(
                    "step {step}: non-finite {what}, update skipped ({detail}); {} skipped so far",
                    self.skipped
                );
                if self.skipped_in_a_row > self.cfg.train.max_skipped {
                    return Err(TrainError::NonFinite {
                        what,
                        step,
                        detail: format!("{detail}; {} steps in a row exceed train.max_skipped", self.skipped_in_a_row),
                    });
                }
                Ok(())
            }
        }
    }

    /// Mean held-out loss per modality over `eval_batches` batches of the eval split
    /// (the same batches every time). None when the config holds no documents out.
    pub fn evaluate(&self) -> Result<Option<EvalRecord>, TrainError> {
        let Some(mut src) = open_source(
            &self.cfg.data,
            self.cfg.train.seed,
            Split::Eval,
            self.reducer.rank(),
            self.reducer.world_size(),
        )?
        else {
            return Ok(None);
        };
        evaluate_model(
            &self.model,
            src.as_mut(),
            self.cfg.train.eval_batches,
            self.cfg.train.routing,
            self.device,
            self.reducer.as_ref(),
        )
        .map(Some)
    }

    /// Writes a checkpoint into the run directory (rank 0 only).
    pub fn save_checkpoint(&self) -> Result<Option<PathBuf>, TrainError> {
        let Some(run) = &self.run_dir else { return Ok(None) };
        if self.reducer.rank() != 0 {
            return Ok(None);
        }
        let (opt_tensors, optimizer_steps) = self.opt.state();
        let meta = Meta {
            version: META_VERSION,
            step: self.step,
            skipped: self.skipped,
            skipped_in_a_row: self.skipped_in_a_row,
            config: self.cfg.clone(),
            loader_state: self.data.state(),
            rng: RngState { init_seed: self.cfg.train.seed, draws_after_init: 0 },
            optimizer_steps,
            tokens: self.tokens,
        };
        checkpoint::save(
            run,
            crate::model::public_parameters(&self.vs),
            opt_tensors,
            &meta,
            self.cfg.train.keep_checkpoints,
        )
        .map(Some)
    }

    /// Trains until `train.steps`, logging, evaluating and checkpointing on the way.
    pub fn run(&mut self) -> Result<TrainSummary, TrainError> {
        let started = Instant::now();
        let total = self.cfg.train.steps;
        let t = &self.cfg.train;
        let (log_every, eval_every, ckpt_every) = (t.log_every.max(1), t.eval_every, t.checkpoint_every);
        if self.verbose {
            eprintln!(
                "training {} ({} parameters, {}) on {:?} from step {} to {total}: {} x {} tokens x {} accumulation",
                self.cfg.model.arch,
                self.param_count(),
                self.cfg.preset,
                self.device,
                self.step,
                self.cfg.data.batch_size,
                self.cfg.data.seq_len,
                self.cfg.optim.grad_accum
            );
        }
        let title = format!(
            "{} {} ({})",
            self.cfg.preset,
            self.cfg.model.arch,
            self.run_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
        );
        let mut last_eval = None;
        while self.step < total {
            let mut record = self.train_step()?;
            let step = record.step;
            if (eval_every > 0 && step % eval_every == 0) || step == total {
                record.eval = self.evaluate()?;
                last_eval = record.eval.clone().or(last_eval);
            }
            let log_now = step % log_every == 0 || step == 1 || step == total || record.eval.is_some();
            if self.verbose && log_now && self.reducer.rank() == 0 {
                eprintln!("{}", record.console_line(total));
            }
            if let Some(log) = &mut self.log {
                log.append(record)?;
                if log_now {
                    log.plot(&title)?;
                }
            }
            if (ckpt_every > 0 && step % ckpt_every == 0) || step == total {
                self.save_checkpoint()?;
            }
        }
        let summary = TrainSummary {
            arch: self.cfg.model.arch,
            run_dir: self.run_dir.clone(),
            steps: self.step,
            skipped: self.skipped,
            tokens: self.tokens,
            wall_s: started.elapsed().as_secs_f64(),
            params: self.param_count(),
            final_train: final_train_losses(self.records()),
            final_eval: last_eval,
            final_diffusion: final_diffusion_loss(self.records()),
        };
        if self.verbose {
            eprintln!("{}", summary.line());
        }
        Ok(summary)
    }
}

/// The parts of `[data]` that decide the batch stream (paths may move on resume).
#[derive(Debug, PartialEq)]
struct DataShape {
    synthetic: bool,
    seq_len: usize,
    batch_size: usize,
    eval_fraction: u64,
    split_segments: bool,
    weights: Vec<u64>,
}

impl DataShape {
    fn of(c: &TrainConfig) -> Self {
        DataShape {
            synthetic: c.data.synthetic,
            seq_len: c.data.seq_len,
            batch_size: c.data.batch_size,
            eval_fraction: c.data.eval_fraction.to_bits(),
            split_segments: c.data.split_segments,
            weights: c.data.weights.iter().map(|w| w.to_bits()).collect(),
        }
    }
}

/// Mean per-modality loss over `batches` batches of `src`, without gradients.
pub fn evaluate_model(
    model: &Model,
    src: &mut dyn BatchSource,
    batches: u64,
    routing: crate::model::Routing,
    device: Device,
    reducer: &dyn GradReducer,
) -> Result<EvalRecord, TrainError> {
    let mut sums = [0f64; 3];
    let mut tokens = [0i64; 3];
    let (mut diff_sum, mut images) = (0f64, 0f64);
    let schedule = Schedule::cosine(model.cfg.diffusion_steps as usize);
    for i in 0..batches.max(1) {
        let batch = src.next_batch()?;
        let mut p = Prepared::new(&model.cfg, &batch, routing, device)?;
        // The same noise at every evaluation: a fixed stream per eval batch.
        let mut rng = diffusion::noise_rng(EVAL_NOISE_SEED, i, 0);
        diffusion::noise_prepared(&mut p, &schedule, noise_policy(&model.cfg), &mut rng);
        let out = tch::no_grad(|| model.loss(&p));
        let s: Vec<f64> = Vec::<f64>::try_from(out.per_modality_sum.to_kind(Kind::Double))
            .map_err(TrainError::torch("read eval loss"))?;
        for m in 0..3 {
            sums[m] += s[m];
            tokens[m] += p.loss_tokens[m];
        }
        if let Some(per_image) = &out.image_diffusion {
            diff_sum += f64::try_from(per_image.sum(Kind::Double)).map_err(TrainError::torch("read eval diffusion"))?;
            images += per_image.size()[0] as f64;
        }
    }
    let mut all: Vec<f64> = sums.iter().copied().chain(tokens.iter().map(|&t| t as f64)).collect();
    all.extend([diff_sum, images]);
    reducer.all_reduce_sum(&mut all)?;
    let mut r = EvalRecord::from_sums([all[0], all[1], all[2]], [all[3] as i64, all[4] as i64, all[5] as i64]);
    r.diffusion = (all[7] > 0.0).then(|| all[6] / all[7]);
    Ok(r)
}

/// `1 / RMS` of the latent values in the first few training batches (a fresh stream, so the
/// run's own stream is untouched); 1 when they hold no latents. Every rank reads the same rows
/// of rank 0's stream, so all ranks agree.
fn measure_latent_scale(cfg: &TrainConfig, world: usize) -> Result<f64, TrainError> {
    let Some(mut src) = open_source(&cfg.data, cfg.train.seed, Split::Train, 0, world)? else { return Ok(1.0) };
    let (mut sum_sq, mut n) = (0f64, 0u64);
    for _ in 0..LATENT_SCALE_BATCHES {
        let b = src.next_batch()?;
        sum_sq += b.latents.data.iter().map(|v| f64::from(v.to_f32()).powi(2)).sum::<f64>();
        n += b.latents.data.len() as u64;
    }
    let rms = if n > 0 { (sum_sq / n as f64).sqrt() } else { 0.0 };
    // Rounded to 4 significant digits: the value is written into the config people read.
    Ok(if rms > 0.0 && rms.is_finite() { format!("{:.4e}", 1.0 / rms).parse().unwrap_or(1.0) } else { 1.0 })
}

/// Batches read to measure `latent_scale`.
const LATENT_SCALE_BATCHES: usize = 16;

/// Seed of the fixed noise draws of held-out diffusion loss.
const EVAL_NOISE_SEED: u64 = 0xE7A1_0000;

/// The Transfusion timestep recipe from the model config.
fn noise_policy(cfg: &crate::model::ModelConfig) -> NoisePolicy {
    NoisePolicy { caption_fraction: cfg.caption_noise_fraction, caption_max_t: cfg.caption_max_t.max(1) as usize }
}

/// Scatter indices and values that add each image's loss to slot 0 (all images) and to slot
/// `1 + bucket(t)`; counts the images per slot on the host.
fn bucket_index(schedule: &Schedule, timesteps: &[usize], per_image: &Tensor, counts: &mut [f64]) -> (Tensor, Tensor) {
    let mut idx: Vec<i64> = vec![0; timesteps.len()];
    counts[0] += timesteps.len() as f64;
    for &t in timesteps {
        let b = 1 + schedule.bucket(t);
        idx.push(b as i64);
        counts[b] += 1.0;
    }
    let idx = Tensor::from_slice(&idx).to_device(per_image.device());
    (idx, Tensor::cat(&[per_image, per_image], 0))
}

/// Mean per-modality train loss over the last tenth of the logged steps (at least one,
/// at most 20), which is steadier than the last step alone.
fn final_train_losses(records: &[StepRecord]) -> PerModality {
    let n = (records.len() / 10).clamp(1, 20).min(records.len());
    let tail = &records[records.len() - n..];
    std::array::from_fn(|m| {
        let v: Vec<f64> = tail.iter().filter_map(|r| r.per_modality()[m]).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    })
}

/// Mean train diffusion loss over the same tail of steps as [`final_train_losses`].
fn final_diffusion_loss(records: &[StepRecord]) -> Option<f64> {
    let n = (records.len() / 10).clamp(1, 20).min(records.len());
    let v: Vec<f64> = records[records.len() - n..].iter().filter_map(|r| r.loss_diffusion).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub arch: Arch,
    pub run_dir: Option<PathBuf>,
    pub steps: u64,
    pub skipped: u64,
    pub tokens: u64,
    pub wall_s: f64,
    pub params: i64,
    /// Mean train loss per modality over the last logged steps.
    pub final_train: PerModality,
    /// Held-out loss at the last evaluation.
    pub final_eval: Option<EvalRecord>,
    /// Transfusion: mean train diffusion loss over the last logged steps.
    #[serde(default)]
    pub final_diffusion: Option<f64>,
}

fn fmt_loss(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

impl TrainSummary {
    pub fn line(&self) -> String {
        let eval = self.final_eval.as_ref().map(EvalRecord::per_modality).unwrap_or([None; 3]);
        let diffusion = match self.final_diffusion {
            Some(d) => format!(
                " | diffusion train {} held-out {}",
                fmt_loss(Some(d)),
                fmt_loss(self.final_eval.as_ref().and_then(|e| e.diffusion))
            ),
            None => String::new(),
        };
        format!(
            "{}: {} steps, {} tokens in {:.1}s | final train text {} image {} speech {} | held-out text {} image {} speech {}",
            self.arch,
            self.steps,
            self.tokens,
            self.wall_s,
            fmt_loss(self.final_train[0]),
            fmt_loss(self.final_train[1]),
            fmt_loss(self.final_train[2]),
            fmt_loss(eval[0]),
            fmt_loss(eval[1]),
            fmt_loss(eval[2]),
        ) + &diffusion
    }
}

/// The result of training several architectures on the same data and steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub runs: Vec<TrainSummary>,
}

impl Comparison {
    /// A table: one row per modality, train and held-out loss per architecture, and the
    /// MoT − dense difference (negative = MoT better).
    pub fn table(&self) -> String {
        let mut s = String::from("modality  split     ");
        for r in &self.runs {
            s.push_str(&format!("{:>10}", r.arch.to_string()));
        }
        let mot = self.runs.iter().position(|r| r.arch == Arch::Mot);
        let dense = self.runs.iter().position(|r| r.arch == Arch::Dense);
        let diff = mot.zip(dense);
        if diff.is_some() {
            s.push_str("  mot-dense");
        }
        s.push('\n');
        for (m, name) in MODALITY_NAMES.iter().enumerate() {
            for split in ["train", "held-out"] {
                let get = |r: &TrainSummary| -> Option<f64> {
                    if split == "train" {
                        r.final_train[m]
                    } else {
                        r.final_eval.as_ref().and_then(|e| e.per_modality()[m])
                    }
                };
                s.push_str(&format!("{name:<9} {split:<9} "));
                for r in &self.runs {
                    s.push_str(&format!("{:>10}", fmt_loss(get(r))));
                }
                if let Some((a, b)) = diff
                    && let (Some(x), Some(y)) = (get(&self.runs[a]), get(&self.runs[b]))
                {
                    s.push_str(&format!("  {:>+9.4}", x - y));
                }
                s.push('\n');
            }
        }
        if self.runs.iter().any(|r| r.final_diffusion.is_some()) {
            for split in ["train", "held-out"] {
                let get = |r: &TrainSummary| -> Option<f64> {
                    if split == "train" { r.final_diffusion } else { r.final_eval.as_ref().and_then(|e| e.diffusion) }
                };
                s.push_str(&format!("{:<9} {split:<9} ", "diffusion"));
                for r in &self.runs {
                    s.push_str(&format!("{:>10}", fmt_loss(get(r))));
                }
                if let Some((a, b)) = diff
                    && let (Some(x), Some(y)) = (get(&self.runs[a]), get(&self.runs[b]))
                {
                    s.push_str(&format!("  {:>+9.4}", x - y));
                }
                s.push('\n');
            }
        }
        for r in &self.runs {
            s.push_str(&format!("{}: {} steps, {} parameters, {:.1}s\n", r.arch, r.steps, r.params, r.wall_s));
        }
        s
    }
}

/// Trains each of `archs` from `base` (same data, seed and steps) in `out/<arch>` and
/// returns the comparison. This is what `motley train --compare` and the demo call.
pub fn compare_architectures(
    base: &TrainConfig,
    out: &Path,
    archs: &[Arch],
    overwrite: bool,
    verbose: bool,
) -> Result<Comparison, TrainError> {
    let mut runs = Vec::new();
    for &arch in archs {
        let mut cfg = base.clone();
        cfg.model.arch = arch;
        let dir = out.join(arch.to_string());
        prepare_run_dir(&dir, overwrite)?;
        let mut t = Trainer::new(cfg)?;
        t.verbose = verbose;
        t.attach_run_dir(&dir)?;
        runs.push(t.run()?);
    }
    let c = Comparison { runs };
    if verbose {
        eprintln!("{}", c.table());
    }
    Ok(c)
}

/// MoT vs dense on the same data and steps (`out/mot`, `out/dense`); with `verbose`, prints
/// each run's console lines and the comparison table on stderr.
pub fn compare_mot_dense(
    base: &TrainConfig,
    out: &Path,
    overwrite: bool,
    verbose: bool,
) -> Result<Comparison, TrainError> {
    compare_architectures(base, out, &[Arch::Mot, Arch::Dense], overwrite, verbose)
}

/// `motley eval`: held-out loss of a checkpoint on `data` (or the corpus it trained on).
pub fn evaluate_checkpoint(
    checkpoint: &Path,
    data: Option<Vec<PathBuf>>,
    batches: u64,
    split: Split,
    device: &str,
) -> Result<(u64, EvalRecord), TrainError> {
    let ckpt = checkpoint::resolve(checkpoint)?;
    let meta = checkpoint::read_meta(&ckpt)?;
    let mut cfg = meta.config;
    if let Some(paths) = data {
        cfg.data.paths = paths;
        cfg.data.synthetic = false;
        cfg.data.weights.clear();
    }
    let device = resolve_device(device)?;
    let reducer = dist::SingleProcess;
    let mut src = open_source(&cfg.data, cfg.train.seed, split, 0, 1)?.ok_or_else(|| TrainError::Config {
        path: "data.eval_fraction".into(),
        msg: "the run held no documents out (eval_fraction = 0); use --split train".into(),
    })?;
    let total = i64::from(src.vocab().total_size);
    if total > cfg.model.vocab_size {
        return Err(TrainError::Config {
            path: "model.vocab_size".into(),
            msg: format!("checkpoint vocabulary {} is smaller than the corpus's {total}", cfg.model.vocab_size),
        });
    }
    let vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), &cfg.model)?;
    checkpoint::load_weights(&vs, &ckpt)?;
    let r = evaluate_model(&model, src.as_mut(), batches, cfg.train.routing, device, &reducer)?;
    Ok((meta.step, r))
}
