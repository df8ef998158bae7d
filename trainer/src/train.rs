//! The training loop: one optimizer step at a time, held-out evaluation, checkpoints,
//! exact resume, and the MoT-vs-dense comparison the demo runs.
//!
//! A step: take `grad_accum` micro-batches, back-propagate each one's share of the mean
//! next-token loss (weighted by loss-bearing tokens counted over every rank and micro-batch, so
//! N ranks × accumulation equal one big batch), check the loss is finite, clip, AdamW with
//! warmup + cosine. With several ranks the last micro-batch's backward sums gradients across
//! ranks bucket by bucket as they complete (dist::c10d::GradSync). With latent images
//! (Transfusion setting) each row's images are noised from a stream keyed by (seed, step, row)
//! and the objective adds λ times the diffusion loss, whose share is weighted by images.
//! Under ZeRO-3 (`train.zero = 3`, [`crate::fsdp`]) unit 0 (embedding, head) is gathered for
//! the step, blocks gather themselves around each run, and gradients arrive reduce-scattered in
//! the optimizer's shard; the gathered copies are freed after the update.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use motley_shards::{Modality, Split};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::checkpoint::{self, META_VERSION, Meta, RngState};
use crate::config::{CheckpointFormat, OnNonFinite, TrainConfig};
use crate::data::BatchSource;
use crate::diffusion::{BUCKETS, NoisePolicy, Schedule};
use crate::dist::c10d::GradSync;
use crate::dist::{self, Comm, Launch, Overlap};
use crate::error::TrainError;
use crate::flat::BucketCap;
use crate::layout::Noising;
use crate::loader::open_source;
use crate::metrics::{EvalRecord, MODALITY_NAMES, MetricsLog, PerModality, StepRecord};
use crate::model::{Arch, Model, Prepared};
use crate::optim::{AdamW, Sharding, StateBytes, learning_rate};
use crate::profile::{self, Profiler};

/// `auto` (CUDA when available), `cpu`, `cuda`, `cuda:N`.
pub fn resolve_device(spec: &str) -> Result<Device, TrainError> {
    resolve_device_for(spec, &Launch::single())
}

/// The device of a rank: `auto` and `cuda` pick `cuda:LOCAL_RANK` (one GPU per rank, as
/// torchrun's users expect); an explicit `cuda:N` must agree with it in a job of several.
pub fn resolve_device_for(spec: &str, launch: &Launch) -> Result<Device, TrainError> {
    let bad = |msg: String| TrainError::Config { path: "train.device".into(), msg };
    let local = launch.local_rank;
    let cuda = |idx: Option<usize>| -> Result<Device, TrainError> {
        let n = tch::Cuda::device_count().max(0) as usize;
        let i = idx.unwrap_or(local);
        if launch.is_distributed() && idx.is_some_and(|i| i != local) {
            return Err(bad(format!("cuda:{i} conflicts with LOCAL_RANK={local}; use `cuda` or `auto`")));
        }
        if i >= n {
            return Err(bad(format!("cuda:{i} requested but this machine has {n} CUDA device(s)")));
        }
        Ok(Device::Cuda(i))
    };
    match spec {
        "auto" if tch::Cuda::is_available() => cuda(None),
        "auto" | "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !tch::Cuda::is_available() {
                return Err(bad(format!("`{s}` requested but CUDA is not available")));
            }
            let idx = s
                .strip_prefix("cuda:")
                .map(|i| i.parse::<usize>().map_err(|_| bad(format!("bad device `{s}`"))))
                .transpose()?;
            cuda(idx)
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
    /// This rank's part in a data-parallel job (one process: no communication).
    comm: Arc<Comm>,
    /// Gradient buckets reduced from autograd hooks (several ranks only).
    sync: Option<GradSync>,
    /// ZeRO-3: gathers and frees the weights, reduce-scatters the gradients.
    fsdp: Option<Arc<crate::fsdp::Fsdp>>,
    /// ZeRO-3: the most weight bytes gathered at once inside a training step.
    gathered_peak: u64,
    /// What the memory plan predicts for this run, and the first step's measured peak.
    plan: crate::plan::Plan,
    step_peak: Option<u64>,
    /// `train.log_rows`: this rank's global row ids, one line per micro-batch.
    rows_log: Option<PathBuf>,
    /// The diffusion noise schedule (used when batches carry latent images).
    schedule: Schedule,
    /// Optimizer steps completed.
    pub step: u64,
    skipped: u64,
    skipped_in_a_row: u64,
    tokens: u64,
    run_dir: Option<PathBuf>,
    log: Option<MetricsLog>,
    /// `train.tensorboard`: rank 0's event file.
    events: Option<crate::tensorboard::EventWriter>,
    /// Where rank 0 copies its checkpoints as they are written (an object store).
    mirror: Option<Arc<dyn crate::mirror::RunMirror>>,
    /// `train.checkpoint_async`: the checkpoint being written in the background.
    writer: Option<std::thread::JoinHandle<Result<PathBuf, TrainError>>>,
    /// `per_rank` with `checkpoint_async`: this rank's files being written, and the meta the
    /// checkpoint completes with once every rank has written (agreed in a step's all-reduce).
    pending: Option<(std::thread::JoinHandle<Result<(), TrainError>>, Meta)>,
    /// Seconds the loop spent in checkpointing (with `checkpoint_async`: the host copy and
    /// any wait for the previous write).
    checkpoint_s: f64,
    /// Set (by a signal handler) to ask the run to checkpoint and stop after the current step.
    stop_flag: Option<Arc<AtomicBool>>,
    /// Some rank's stop flag was set at the last step (agreed through the step's all-reduce,
    /// so every rank stops after the same step).
    stop_agreed: bool,
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
    /// Under a launcher (torchrun, Slurm, `--nproc`) it first joins the job: ranks check they
    /// agree on config and corpus, and rank 0's weights are broadcast.
    pub fn new(cfg: TrainConfig) -> Result<Self, TrainError> {
        cfg.validate()?;
        if cfg.model.untie_head && cfg.model.arch != crate::model::Arch::Mot {
            // Kept valid so one config serves `--compare`: a baseline has one norm and head.
            tracing::warn!(
                "model.untie_head applies to MoT only; the {:?} baseline keeps one shared head",
                cfg.model.arch
            );
        }
        let launch = Launch::from_env()?;
        if cfg.train.threads > 0 {
            tch::set_num_threads(cfg.train.threads);
        } else if launch.local_world > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
            tch::set_num_threads(dist::default_threads(launch.local_world));
        }
        let device = resolve_device_for(&cfg.train.device, &launch)?;
        let timeout = Duration::from_secs_f64(cfg.train.dist_timeout_s);
        let local_world = launch.local_world;
        let comm = Comm::for_process(launch, cfg.train.dist_backend, device, timeout)?;
        let result = Self::build(cfg, device, Arc::clone(&comm), local_world);
        if let Err(e) = &result {
            // The other ranks would wait for this one at the next collective.
            comm.report_failure(e);
        }
        result
    }

    /// The rest of [`Trainer::new`], once this rank joined its job.
    fn build(mut cfg: TrainConfig, device: Device, comm: Arc<Comm>, local_world: usize) -> Result<Self, TrainError> {
        let (rank, world) = (comm.rank(), comm.world());
        cfg.resolve_global_batch(world)?;
        let data = open_source(&cfg.data, cfg.train.seed, Split::Train, rank, world)?
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
            cfg.model.latent_scale = measure_latent_scale(&cfg, world)?;
            tracing::info!("latent_scale = {} (1 / RMS of the corpus's latents)", cfg.model.latent_scale);
        }
        comm.agree("config and corpus", &run_facts(&cfg, data.vocab())?)?;
        let target = if device.is_cuda() { crate::plan::Target::Cuda } else { crate::plan::Target::Cpu };
        let (memory, of) = memory_budget(&cfg, device, local_world);
        let plan = crate::plan::plan(&cfg, world, memory, target, 0);
        if !plan.fits {
            return Err(TrainError::Config {
                path: "train.device_memory".into(),
                msg: format!(
                    "the memory plan needs {:.3} GB per rank, more than {of}; {}",
                    plan.bytes.total / 1e9,
                    match plan.suggestions.first() {
                        Some(s) if !s.starts_with("does not fit") =>
                            format!("it fits with: --set {}", s.replace(' ', " --set ")),
                        Some(s) => s.clone(),
                        None => "see `motley plan`".into(),
                    }
                ),
            });
        }
        let schedule = Schedule::cosine(cfg.model.diffusion_steps as usize);
        // ZeRO-3: the whole model is built in host memory, never on the device; each rank moves
        // only its chunks there (the optimizer's shard) and gathers units as they run.
        let build_on = if cfg.train.zero == 3 { Device::Cpu } else { device };
        let vs = nn::VarStore::new(build_on);
        let mut model = Model::new_seeded_for(&vs.root(), &cfg.model, cfg.train.seed as i64, device)?;
        model.set_activation_checkpointing(cfg.train.activation_checkpointing.every());
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let sharding = Sharding {
            rank,
            world,
            zero: cfg.train.zero >= 1,
            full_shard: cfg.train.zero == 3,
            device: Some(device),
            buckets: BucketCap::ddp(cfg.train.bucket_mb, Kind::Float.elt_size_in_bytes() as i64),
        };
        let opt = AdamW::sharded(vars, &cfg.optim, sharding).map_err(|(_, e)| e)?;
        let fsdp = opt.full_shard_parts().map(|(layout, shard, grad, params)| {
            Arc::new(crate::fsdp::Fsdp::new(Arc::clone(&comm), layout, shard, grad, params))
        });
        model.set_fsdp(fsdp.clone());
        let sync = match comm.group() {
            Some(_) if fsdp.is_some() => None,
            Some(group) => {
                let b = opt
                    .buckets()
                    .ok_or_else(|| TrainError::Distributed("the optimizer has no flat gradient buffer".into()))?;
                Some(GradSync::new(group, &b.params, &b.bucket_of, &b.grads, b.shards.as_deref())?)
            }
            None => None,
        };
        let t = Trainer {
            cfg,
            device,
            vs,
            model,
            opt,
            data,
            comm,
            sync,
            fsdp,
            gathered_peak: 0,
            plan,
            step_peak: None,
            rows_log: None,
            schedule,
            step: 0,
            skipped: 0,
            skipped_in_a_row: 0,
            tokens: 0,
            run_dir: None,
            log: None,
            events: None,
            mirror: None,
            writer: None,
            pending: None,
            checkpoint_s: 0.0,
            stop_flag: None,
            stop_agreed: false,
            verbose: true,
        };
        t.broadcast_weights()?;
        Ok(t)
    }

    /// blake3 of this rank's weights (public names, in name order); with
    /// `train.verify_replicas` in a job of several, checked equal on every rank.
    fn verify_replicas(&self) -> Result<Option<String>, TrainError> {
        if !self.cfg.train.verify_replicas {
            return Ok(None);
        }
        let mut h = blake3::Hasher::new();
        for (name, t) in self.public_weights(true)? {
            let t = t.detach().to_device(Device::Cpu).contiguous().to_kind(Kind::Float);
            let v: Vec<f32> = Vec::try_from(t.view([-1])).map_err(TrainError::torch(format!("read {name}")))?;
            h.update(name.as_bytes());
            for x in v {
                h.update(&x.to_bits().to_le_bytes());
            }
        }
        let hex = h.finalize().to_hex().to_string();
        self.comm.agree("final weights", &[("weights (blake3)", hex.clone())])?;
        Ok(Some(hex))
    }

    /// Every rank starts from rank 0's weights (seeded init already agrees; a checkpoint read
    /// by every rank too, but this makes it so whatever each rank read).
    fn broadcast_weights(&self) -> Result<(), TrainError> {
        // Under ZeRO-3 each rank keeps only its chunks of the weights it built (or read).
        if !self.comm.is_distributed() || self.fsdp.is_some() {
            return Ok(());
        }
        // Bucket by bucket over the flat parameter buffer every parameter is a view of.
        for range in self.opt.param_ranges() {
            self.comm.broadcast(&range, 0)?;
        }
        Ok(())
    }

    /// Continues the run in `run` (or from a checkpoint folder) exactly where its latest
    /// checkpoint left it, on any number of ranks: the global batch stays, so accumulation is
    /// re-derived for the new world size. `overrides` may change the loop (`train.steps`,
    /// cadence, device, the data-parallel settings), the corpus location and, when the global
    /// batch allows, the micro-batch size — nothing that would change the model or its data.
    pub fn resume(run: &Path, overrides: &[String]) -> Result<Self, TrainError> {
        let ckpt = checkpoint::resolve(run)?;
        let meta = checkpoint::read_meta(&ckpt)?;
        let saved = meta.config.clone();
        let cfg = saved.apply_overrides(overrides)?;
        let frozen = |c: &TrainConfig| {
            let mut o = c.optim.clone();
            o.grad_accum = 0; // derived from the global batch and the world size
            let mut d = DataShape::of(c);
            d.batch_size = 0; // free: the loader resumes at any micro-batch size
            (c.model.clone(), o, c.train.seed, c.train.routing, d)
        };
        if frozen(&cfg) != frozen(&saved) {
            return Err(TrainError::Config {
                path: "--resume".into(),
                msg: "overrides may only change train.steps / cadence / device / data-parallel settings, data.paths \
                      and data.batch_size on resume"
                    .into(),
            });
        }
        let mut t = Trainer::new(cfg)?;
        // Memory-mapped and read a range at a time: each rank reads what it keeps.
        let stored = crate::per_rank::Stored::open(&ckpt, true)?;
        match &t.fsdp {
            // This rank's chunks only: no rank holds the whole model.
            Some(_) => t.opt.load_weight_shard(&stored)?,
            None => checkpoint::load_weights(&t.vs, &ckpt)?,
        }
        t.broadcast_weights()?;
        t.opt.load_state(&stored, &meta.optimizer_steps)?;
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

    /// Writes the resolved config into `dir` and appends metrics there from now on (rank 0).
    pub fn attach_run_dir(&mut self, dir: &Path) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(TrainError::io("create run dir", dir))?;
        if self.comm.rank() == 0 {
            checkpoint::write_atomic(&dir.join("config.toml"), self.cfg.to_toml()?.as_bytes())?;
            checkpoint::snapshot_tokenizers(dir, &self.data.tokenizer_files())?;
            self.log = Some(MetricsLog::open(dir, self.step)?);
            if self.cfg.train.tensorboard {
                let resumed = (self.step > 0).then_some(self.step);
                self.events = Some(crate::tensorboard::EventWriter::create(&dir.join("tensorboard"), resumed)?);
            }
        }
        if self.cfg.train.log_rows {
            let path = dir.join("rows").join(format!("rank-{}.jsonl", self.comm.rank()));
            truncate_row_log(&path, self.step)?;
            self.rows_log = Some(path);
        }
        self.run_dir = Some(dir.to_path_buf());
        Ok(())
    }

    /// This rank's place in its job.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// Bytes of weights, gradients and optimizer moments this rank holds.
    pub fn state_bytes(&self) -> StateBytes {
        self.opt.state_bytes()
    }

    pub fn run_dir(&self) -> Option<&Path> {
        self.run_dir.as_deref()
    }

    /// A flag that, once set (by a SIGTERM handler, say), makes the run finish its current
    /// step, write a checkpoint and return early (`TrainSummary::interrupted`). Every rank of a
    /// job stops after the same step: the flags travel with the step's metrics all-reduce.
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop_flag = Some(flag);
    }

    /// Copies every checkpoint (and the run's files) through `mirror`, in the background; the
    /// run waits for the copies only at its end. Every rank takes one: rank 0 copies complete
    /// checkpoints, and each rank its own files of a per-rank checkpoint.
    pub fn set_mirror(&mut self, mirror: Box<dyn crate::mirror::RunMirror>) {
        self.mirror = Some(Arc::from(mirror));
    }

    /// Step records logged so far (empty without a run directory).
    pub fn records(&self) -> &[StepRecord] {
        self.log.as_ref().map_or(&[], |l| l.records.as_slice())
    }

    pub fn param_count(&self) -> i64 {
        // From the optimizer's shapes: under ZeRO-3 the tensors are empty between uses.
        self.opt.params.iter().map(|p| p.shape.iter().product::<i64>()).sum()
    }

    /// One optimizer step (several micro-batches under gradient accumulation).
    pub fn train_step(&mut self) -> Result<StepRecord, TrainError> {
        let result = self.train_step_inner();
        if let Err(e) = &result {
            self.comm.report_failure(e);
        }
        result
    }

    fn train_step_inner(&mut self) -> Result<StepRecord, TrainError> {
        let started = Instant::now();
        let step = self.step + 1;
        let routing = self.cfg.train.routing;
        // Lay out all micro-batches first: their loss-token counts weight the accumulation.
        let data_range = profile::range("motley::data");
        let mut micro = Vec::with_capacity(self.cfg.optim.grad_accum as usize);
        let mut tokens = 0u64;
        let policy = noise_policy(&self.model.cfg);
        for i in 0..self.cfg.optim.grad_accum {
            let batch = self.data.next_batch()?;
            tokens += batch.numel() as u64;
            self.log_rows(step, i, &batch.row_ids)?;
            let noising = Noising {
                schedule: &self.schedule,
                policy,
                seed: self.cfg.train.seed,
                step,
                fallback_stream: (self.comm.rank() as u64) << 48 | i << 32,
            };
            micro.push(Prepared::build(&self.model.cfg, &batch, routing, self.device, Some(&noising))?);
        }
        // Loss tokens per modality and images, over every rank and micro-batch: each rank's
        // loss is its sum divided by these, so the summed gradient is the global mean's.
        let mut global = [0f64; Modality::COUNT + 1];
        for p in &micro {
            for (c, n) in global.iter_mut().zip(p.loss_tokens) {
                *c += n as f64;
            }
            global[Modality::COUNT] += p.latent.as_ref().map_or(0, |l| l.n_images()) as f64;
        }
        drop(data_range);
        let counts: [f64; Modality::COUNT] = std::array::from_fn(|m| global[m]);
        self.comm.all_reduce_sum(&mut global)?;
        let total = global[..Modality::COUNT].iter().sum::<f64>().max(1.0);
        let images = global[Modality::COUNT].max(1.0);
        let lambda = self.model.cfg.diffusion_lambda;
        let mut loss_acc = Tensor::zeros([], (Kind::Float, self.device));
        let mut sums_acc = Tensor::zeros([Modality::COUNT as i64], (Kind::Float, self.device));
        // Diffusion: [sum over images, sum per timestep bucket] and the matching image counts.
        let mut diff_acc = Tensor::zeros([1 + BUCKETS as i64], (Kind::Float, self.device));
        let mut diff_counts = [0f64; 1 + BUCKETS];
        let last = micro.len().saturating_sub(1);
        if let Some(f) = &self.fsdp {
            // Unit 0 stays gathered for the step; its gradients accumulate over micro-batches.
            f.reset_peak();
            f.gather(0)?;
            f.link_grads(0)?;
        }
        for (i, p) in micro.iter().enumerate() {
            if i == last
                && let Some(sync) = &mut self.sync
            {
                // Only the last micro-batch communicates (DDP's no_sync for the others).
                sync.arm();
            }
            let forward = profile::range("motley::forward");
            let out = self.model.loss(p);
            if let Some(f) = &self.fsdp {
                f.take_error()?;
            }
            drop(forward);
            let share = p.loss_tokens.iter().sum::<i64>() as f64 / total;
            let mut scaled = out.lm_loss * share;
            if let (Some(d), Some(per_image), Some(lat)) = (&out.diffusion_loss, &out.image_diffusion, &p.latent) {
                scaled += d * (lambda * lat.n_images() as f64 / images);
                let (idx, src) = bucket_index(&self.schedule, &lat.timesteps, per_image, &mut diff_counts);
                diff_acc = diff_acc.index_add(0, &idx, &src);
            }
            let _backward = profile::range("motley::backward");
            scaled.f_backward().map_err(TrainError::torch("backward"))?;
            loss_acc += scaled.detach();
            sums_acc += out.per_modality_sum;
        }
        let comm_started = Instant::now();
        let grad_sync = profile::range("motley::grad_sync");
        let overlap = match &mut self.sync {
            Some(sync) => sync.finish().map_err(|e| self.comm.explain(e))?,
            None => Overlap::default(),
        };
        if let Some(f) = &self.fsdp {
            f.reduce_pending()?;
        }
        drop(grad_sync);
        let mut comm_s = comm_started.elapsed().as_secs_f64();
        // One device → host read per step: the loss, for the finiteness check and the log.
        // Layout: [loss, per-modality sums (3), diffusion sums (1 + BUCKETS)].
        let host: Vec<f64> =
            Vec::<f64>::try_from(Tensor::cat(&[loss_acc.view([1]), sums_acc, diff_acc], 0).to_kind(Kind::Double))
                .map_err(TrainError::torch("read loss"))?;
        let sums_len = host.len();
        let mut reduce = host.clone();
        reduce.extend(counts);
        reduce.extend(diff_counts);
        // Then how many ranks still write their part of a per-rank checkpoint, last how many
        // were asked to stop (each read once here, so all ranks agree).
        reduce.push(if self.pending.as_ref().is_some_and(|(h, _)| !h.is_finished()) { 1.0 } else { 0.0 });
        reduce.push(if self.stop_flag.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) { 1.0 } else { 0.0 });
        let t0 = Instant::now();
        self.comm.all_reduce_sum(&mut reduce)?;
        comm_s += t0.elapsed().as_secs_f64();
        self.stop_agreed |= reduce.pop().is_some_and(|n| n > 0.0);
        if reduce.pop().is_some_and(|n| n == 0.0) && self.pending.is_some() {
            // Every rank's files are written: the checkpoint is completed now, not at the next.
            let t0 = Instant::now();
            self.finish_pending()?;
            self.checkpoint_s += t0.elapsed().as_secs_f64();
        }
        let mean = |sum: usize, count: usize| (reduce[count] > 0.0).then(|| reduce[sum] / reduce[count]);
        let per_modality: PerModality = std::array::from_fn(|m| mean(1 + m, sums_len + m));
        let d0 = 1 + Modality::COUNT;
        let loss_diffusion = mean(d0, sums_len + Modality::COUNT);
        let diffusion_buckets: Vec<Option<f64>> = if loss_diffusion.is_some() {
            (1..=BUCKETS).map(|k| mean(d0 + k, sums_len + Modality::COUNT + k)).collect()
        } else {
            Vec::new()
        };
        // The ranks' shares add up to the global objective.
        let loss = reduce[0];
        let lr = learning_rate(&self.cfg.optim, step, self.cfg.train.steps);
        let world = self.comm.world() as u64;
        let mut record = StepRecord {
            step,
            loss: Some(loss).filter(|l| l.is_finite()),
            loss_text: per_modality[0].filter(|l| l.is_finite()),
            loss_image: per_modality[1].filter(|l| l.is_finite()),
            loss_speech: per_modality[2].filter(|l| l.is_finite()),
            lr,
            grad_norm: 0.0,
            tokens: tokens * world,
            tokens_per_s: 0.0,
            mfu: None,
            skipped: false,
            eval: None,
            loss_diffusion,
            diffusion_buckets,
            comm_s: self.comm.is_distributed().then_some(0.0),
            buckets_overlapped: self.comm.is_distributed().then_some(overlap.in_backward),
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
        // Every rank sees the same global loss and gradient norm, so all take the same branch.
        if !loss.is_finite() {
            self.non_finite("loss", step, format!("loss={loss} ({})", detail()))?;
            record.skipped = true;
        } else {
            let t0 = Instant::now();
            let _optimizer = profile::range("motley::optimizer");
            let norm = self.opt.grad_norm(&self.comm)?;
            record.grad_norm = norm;
            if !norm.is_finite() {
                self.non_finite("gradient norm", step, format!("grad_norm={norm}, loss={loss} ({})", detail()))?;
                record.skipped = true;
            } else {
                let clip = self.cfg.optim.grad_clip;
                if clip > 0.0 && norm > clip {
                    self.opt.scale_grads(clip / (norm + 1e-6));
                }
                self.opt.step(lr, &self.comm)?;
                self.skipped_in_a_row = 0;
            }
            if self.opt.is_sharded() {
                // The norm's and the parameters' all-gather are communication too.
                comm_s += t0.elapsed().as_secs_f64();
            }
        }
        self.opt.zero_grad();
        if let Some(f) = &self.fsdp {
            self.gathered_peak = self.gathered_peak.max(f.resident().peak_gathered);
            // The update made the gathered copies stale.
            f.release_all()?;
        }
        self.step = step;
        self.tokens += tokens * world;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        record.tokens_per_s = record.tokens as f64 / secs;
        if let Some(c) = &mut record.comm_s {
            *c = comm_s;
        }
        if self.device.is_cuda() && self.cfg.train.peak_tflops > 0.0 {
            let flops = self.model.cfg.flops_per_token(self.cfg.data.seq_len as i64) * record.tokens_per_s;
            record.mfu = Some(flops / (self.cfg.train.peak_tflops * 1e12 * world as f64));
        }
        Ok(record)
    }

    /// `train.log_rows`: appends this micro-batch's global row ids to this rank's row log.
    fn log_rows(&self, step: u64, micro: u64, rows: &[u64]) -> Result<(), TrainError> {
        let Some(path) = &self.rows_log else { return Ok(()) };
        let line = serde_json::json!({ "step": step, "micro": micro, "rank": self.comm.rank(), "rows": rows });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(TrainError::io("open row log", path))?;
        writeln!(f, "{line}").map_err(TrainError::io("write row log", path))
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
        let Some(mut src) =
            open_source(&self.cfg.data, self.cfg.train.seed, Split::Eval, self.comm.rank(), self.comm.world())?
        else {
            return Ok(None);
        };
        // `eval_batches` global batches of held-out rows: the same rows whatever the number of
        // ranks (each evaluates its share of every micro-batch).
        let _gathered = self.gathered_root()?;
        evaluate_model(
            &self.model,
            src.as_mut(),
            self.cfg.train.eval_batches * self.cfg.optim.grad_accum,
            self.cfg.train.routing,
            self.device,
            &self.comm,
        )
        .map(Some)
    }

    /// Writes a checkpoint into the run directory. Every rank must call it (sharded optimizer
    /// state is gathered); rank 0 writes — with `train.checkpoint_async`, on a background
    /// thread from a host copy, after the previous write has finished. Returns the folder
    /// the checkpoint is (or will be, once renamed into place) in.
    pub fn save_checkpoint(&mut self) -> Result<Option<PathBuf>, TrainError> {
        let t0 = Instant::now();
        let r = self.save_checkpoint_inner();
        self.checkpoint_s += t0.elapsed().as_secs_f64();
        r
    }

    /// Waits for the checkpoint being written in the background, if any; its failure is the
    /// run's.
    pub fn wait_for_checkpoint(&mut self) -> Result<(), TrainError> {
        self.finish_pending()?;
        match self.writer.take() {
            None => Ok(()),
            Some(h) => h
                .join()
                .map_err(|p| TrainError::Checkpoint {
                    path: self.run_dir.clone().unwrap_or_default(),
                    msg: format!("the checkpoint writer panicked: {}", panic_text(&p)),
                })?
                .map(|_| ()),
        }
    }

    /// What the checkpoint of this step records besides tensors.
    fn meta(&self, optimizer_steps: std::collections::BTreeMap<String, i64>) -> Meta {
        Meta {
            version: META_VERSION,
            step: self.step,
            skipped: self.skipped,
            skipped_in_a_row: self.skipped_in_a_row,
            config: self.cfg.clone(),
            loader_state: self.data.state(),
            rng: RngState { init_seed: self.cfg.train.seed, draws_after_init: 0 },
            optimizer_steps,
            tokens: self.tokens,
            vocab: Some(self.data.vocab().clone()),
        }
    }

    fn save_checkpoint_inner(&mut self) -> Result<Option<PathBuf>, TrainError> {
        let Some(run) = self.run_dir.clone() else { return Ok(None) };
        if self.cfg.train.checkpoint_format == CheckpointFormat::PerRank {
            return self.save_per_rank(&run).map(Some);
        }
        // Under ZeRO-3 every rank takes part in gathering the weights rank 0 writes.
        let weights = self.public_weights(false)?;
        let Some((opt_tensors, optimizer_steps)) = self.opt.state(&self.comm)? else { return Ok(None) };
        let meta = self.meta(optimizer_steps);
        let (keep, shard_mb, mirror) =
            (self.cfg.train.keep_checkpoints, self.cfg.train.checkpoint_shard_mb, self.mirror.clone());
        // One write at a time, in step order (pruning and the mirror see them in order).
        self.wait_for_checkpoint()?;
        let write = move |weights, opt_tensors, meta: Meta| -> Result<PathBuf, TrainError> {
            let pinned = mirror.as_ref().and_then(|m| m.in_use());
            let dir = checkpoint::save(&run, weights, opt_tensors, &meta, keep, shard_mb, pinned.as_deref())?;
            if let Some(m) = &mirror {
                m.saved(&run, &dir).map_err(TrainError::Mirror)?;
            }
            Ok(dir)
        };
        if !self.cfg.train.checkpoint_async {
            return write(weights, opt_tensors, meta).map(Some);
        }
        // Host copies of their own: training goes on updating the live tensors in place.
        let dir = checkpoint::dir_of(self.run_dir.as_deref().unwrap_or(Path::new(".")), meta.step);
        let (weights, opt_tensors) = (checkpoint::host_copies(weights)?, checkpoint::host_copies(opt_tensors)?);
        let handle = std::thread::Builder::new()
            .name("motley-checkpoint".into())
            .spawn(move || write(weights, opt_tensors, meta))
            .map_err(TrainError::io("start the checkpoint writer", &dir))?;
        self.writer = Some(handle);
        Ok(Some(dir))
    }

    /// `per_rank`: every rank copies its pieces of the flat weights and moments to the host and
    /// writes them into the checkpoint's temporary folder (rank 0 the index too; with
    /// `checkpoint_async` on a background thread); once all have written, rank 0 completes
    /// the checkpoint ([`Trainer::commit_per_rank`]). Every rank must call it.
    fn save_per_rank(&mut self, run: &Path) -> Result<PathBuf, TrainError> {
        self.wait_for_checkpoint()?;
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let params = self.opt.param_shapes();
        let Some((layout, _, buffers)) = self.opt.rank_buffers() else {
            return Err(TrainError::Config {
                path: "train.checkpoint_format".into(),
                msg: "per_rank needs the optimizer's flat buffers (parameters of one dtype and device)".into(),
            });
        };
        let pieces = crate::per_rank::pieces(layout, &params, rank);
        let index = (rank == 0).then(|| crate::per_rank::RankIndex::new(layout, &params));
        // A snapshot: the next step updates the buffers in place.
        let (weights, moments) = crate::per_rank::host_pieces(&pieces, &buffers)?;
        let meta = self.meta(self.opt.steps());
        // Rank 0 empties the temporary folder before anyone writes into it.
        let prepared = if rank == 0 { checkpoint::prepare(run, meta.step).map(|_| ()) } else { Ok(()) };
        self.agree_ok(prepared, "prepare the checkpoint folder")?;
        let tmp = checkpoint::tmp_dir(run, meta.step);
        let (step, mirror) = (meta.step, self.mirror.clone());
        let write = move || -> Result<(), TrainError> {
            // On a node that does not share rank 0's disk, nobody else made the folder.
            std::fs::create_dir_all(&tmp).map_err(TrainError::io("create", &tmp))?;
            if let Some(index) = index {
                let json = serde_json::to_vec(&index).map_err(|e| TrainError::Checkpoint {
                    path: tmp.join(crate::per_rank::INDEX_FILE),
                    msg: e.to_string(),
                })?;
                checkpoint::write_atomic(&tmp.join(crate::per_rank::INDEX_FILE), &json)?;
            }
            crate::per_rank::write_rank(&tmp, rank, world, weights, moments)?;
            if let Some(m) = &mirror {
                // Under the name the checkpoint will have, not its temporary folder's.
                let at = checkpoint::dir_of(Path::new(""), step);
                for f in [crate::per_rank::model_file(rank, world), crate::per_rank::optimizer_file(rank, world)] {
                    m.put_run_file(&at.join(&f).to_string_lossy(), &tmp.join(&f)).map_err(TrainError::Mirror)?;
                }
            }
            Ok(())
        };
        let dir = checkpoint::dir_of(run, meta.step);
        // Copying to the mirror is part of writing: always behind the training loop.
        if self.cfg.train.checkpoint_async || self.mirror.is_some() {
            let handle = std::thread::Builder::new()
                .name("motley-checkpoint".into())
                .spawn(write)
                .map_err(TrainError::io("start the checkpoint writer", &dir))?;
            self.pending = Some((handle, meta));
            return Ok(dir);
        }
        self.commit_per_rank(write(), &meta)?;
        Ok(dir)
    }

    /// Every rank's outcome agreed (a collective): all succeeded, or each rank returns an error.
    fn agree_ok(&self, mine: Result<(), TrainError>, what: &str) -> Result<(), TrainError> {
        let mut failed = [if mine.is_err() { 1.0 } else { 0.0 }];
        self.comm.all_reduce_sum(&mut failed)?;
        mine?;
        if failed[0] > 0.0 {
            return Err(TrainError::Distributed(format!(
                "{} rank(s) failed to {what} (their errors say why)",
                failed[0]
            )));
        }
        Ok(())
    }

    /// `per_rank`: once every rank has written its files (`written` is this rank's outcome),
    /// rank 0 checks the folder holds them all, writes `meta.json`, renames it into place,
    /// prunes, and hands it to the mirror. Every rank must call it.
    fn commit_per_rank(&mut self, written: Result<(), TrainError>, meta: &Meta) -> Result<(), TrainError> {
        self.agree_ok(written, "write their part of the checkpoint")?;
        let Some(run) = self.run_dir.clone() else { return Ok(()) };
        let tmp = checkpoint::tmp_dir(&run, meta.step);
        let committed = if self.comm.rank() == 0 { self.commit_here(&run, meta) } else { Ok(()) };
        self.agree_ok(committed, "complete the checkpoint")?;
        if self.comm.rank() != 0 && self.mirror.is_some() && tmp.exists() {
            // A node without rank 0's disk: its files are at the mirror, the folder was never
            // committed here (ranks sharing this node may race to remove it).
            if let Err(e) = std::fs::remove_dir_all(&tmp)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("{}: could not remove ({e}); its files are copied already", tmp.display());
            }
        }
        Ok(())
    }

    /// Rank 0's part of [`Trainer::commit_per_rank`].
    fn commit_here(&self, run: &Path, meta: &Meta) -> Result<(), TrainError> {
        if self.mirror.is_none() {
            // Every rank's files, complete and as the index says (their headers only): a
            // rank that wrote to a disk of its own shows up here, not at resume. With a
            // mirror the ranks copied their files there, and the mirror checks them.
            crate::per_rank::Stored::open(&checkpoint::tmp_dir(run, meta.step), true)?;
        }
        let pinned = self.mirror.as_ref().and_then(|m| m.in_use());
        let dir = checkpoint::commit(run, meta, self.cfg.train.keep_checkpoints, pinned.as_deref())?;
        if let Some(m) = &self.mirror {
            m.saved(run, &dir).map_err(TrainError::Mirror)?;
        }
        Ok(())
    }

    /// `per_rank` with `checkpoint_async`: joins this rank's writer and completes the
    /// checkpoint. Every rank must call it (it is called where all ranks agree to).
    fn finish_pending(&mut self) -> Result<(), TrainError> {
        let Some((handle, meta)) = self.pending.take() else { return Ok(()) };
        let written = handle.join().unwrap_or_else(|p| {
            Err(TrainError::Checkpoint {
                path: self.run_dir.clone().unwrap_or_default(),
                msg: format!("the checkpoint writer panicked: {}", panic_text(&p)),
            })
        });
        self.commit_per_rank(written, &meta)
    }

    /// The weights under their public names, sorted by name. Under ZeRO-3 every rank must
    /// call it: units are gathered one at a time and copied to host memory (on rank 0 only,
    /// unless `every_rank`), so the whole model never exists on the device.
    fn public_weights(&self, every_rank: bool) -> Result<Vec<(String, Tensor)>, TrainError> {
        let Some(f) = &self.fsdp else { return Ok(crate::model::public_parameters(&self.vs)) };
        let keep = every_rank || self.comm.rank() == 0;
        let mut out = Vec::new();
        f.each_unit_gathered(|params| {
            if keep {
                for (name, t) in params {
                    for (public, view) in crate::model::public_views(name, t) {
                        // A copy of its own: the gathered buffer is freed after this unit.
                        let mut host = Tensor::empty(view.size(), (view.kind(), Device::Cpu));
                        tch::no_grad(|| host.f_copy_(&view))
                            .map_err(TrainError::torch(format!("copy {public} to the host")))?;
                        out.push((public, host));
                    }
                }
            }
            Ok(())
        })?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// ZeRO-3: unit 0 gathered until the guard drops (blocks gather themselves).
    fn gathered_root(&self) -> Result<Gathered, TrainError> {
        if let Some(f) = &self.fsdp {
            f.gather(0)?;
        }
        Ok(Gathered(self.fsdp.clone()))
    }

    /// The ZeRO-3 state of this rank (None without ZeRO-3).
    pub fn fsdp(&self) -> Option<&crate::fsdp::Fsdp> {
        self.fsdp.as_deref()
    }

    /// Trains until `train.steps`, logging, evaluating and checkpointing on the way. In a job
    /// of several ranks, a failure is posted for the other ranks (their errors name this one).
    pub fn run(&mut self) -> Result<TrainSummary, TrainError> {
        let mut result = self.run_inner();
        if result.is_err()
            && let Some((handle, _)) = self.pending.take()
        {
            // Completing a per-rank checkpoint takes every rank, which a failed run may not
            // have: its files are left in the temporary folder, the previous checkpoint stands.
            let _ = handle.join();
        }
        // A checkpoint still being written (the run failed after starting it) is finished.
        if let Err(e) = self.wait_for_checkpoint() {
            match &result {
                Ok(_) => result = Err(e),
                Err(_) => eprintln!("{e}"),
            }
        }
        // The copies still in flight finish either way: a failed run keeps its checkpoints.
        if let (Some(m), Some(run), 0) = (&self.mirror, &self.run_dir, self.comm.rank()) {
            let keep = self.cfg.train.keep_checkpoints;
            let done = m
                .wait()
                .map_err(TrainError::Mirror)
                // The checkpoint pinned while it was copied is pruned now, here and there.
                .and_then(|()| checkpoint::prune(run, keep, None))
                .and_then(|()| m.finish(run).map_err(TrainError::Mirror));
            match (&result, done) {
                (Ok(_), Err(e)) => result = Err(e),
                (Err(_), Err(e)) => eprintln!("{e}"),
                _ => {}
            }
        }
        if let Err(e) = &result {
            self.comm.report_failure(e);
        }
        result
    }

    fn run_inner(&mut self) -> Result<TrainSummary, TrainError> {
        let started = Instant::now();
        let total = self.cfg.train.steps;
        let t = &self.cfg.train;
        let (log_every, eval_every, ckpt_every) = (t.log_every.max(1), t.eval_every, t.checkpoint_every);
        let rank0 = self.comm.rank() == 0;
        if self.verbose && rank0 {
            eprintln!(
                "training {} ({} parameters, {}) on {:?} from step {} to {total}: {} x {} tokens x {} accumulation{}",
                self.cfg.model.arch,
                self.param_count(),
                self.cfg.preset,
                self.device,
                self.step,
                self.cfg.data.batch_size,
                self.cfg.data.seq_len,
                self.cfg.optim.grad_accum,
                if self.comm.is_distributed() {
                    format!(" x {} ranks ({})", self.comm.world(), self.comm.backend_name())
                } else {
                    String::new()
                }
            );
        }
        if self.verbose && self.comm.is_distributed() {
            let b = self.opt.state_bytes();
            let mib = |x: u64| x as f64 / (1024.0 * 1024.0);
            eprintln!(
                "rank {}: weights {:.1} MiB, gradients {:.1} MiB, optimizer moments {:.1} MiB{}",
                self.comm.rank(),
                mib(b.weights),
                mib(b.gradients),
                mib(b.moments),
                if self.opt.is_full_shard() {
                    format!(" (ZeRO-3: 1/{} of each; blocks gathered while they run)", self.comm.world())
                } else if self.opt.is_sharded() {
                    format!(" (ZeRO-1: 1/{} of them)", self.comm.world())
                } else {
                    String::new()
                }
            );
        }
        let title = format!(
            "{} {} ({})",
            self.cfg.preset,
            self.cfg.model.arch,
            self.run_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
        );
        let mut last_eval = None;
        let mut interrupted = false;
        let mut measured = 0;
        let stop = if self.cfg.train.stop_at > 0 { self.cfg.train.stop_at.min(total) } else { total };
        let mut profiler = match (&self.cfg.train.profile_steps[..], &self.run_dir) {
            (&[first, last], Some(run)) => {
                Some(Profiler::new([first, last], run, self.comm.rank(), self.device.is_cuda()))
            }
            _ => None,
        };
        while self.step < stop {
            let step_range = profiler.as_mut().map(|p| p.before_step(self.step + 1)).transpose()?;
            // The memory tracker takes the thread's profiler slot (as torch.profiler's
            // profile_memory does): steps being profiled are not measured.
            let profiling = profiler.as_ref().is_some_and(Profiler::recording);
            let mut record = if measured < 2 && !profiling {
                // The allocations of this process's second step (the first also makes what
                // lives on, such as lazily built tables) beside the plan's prediction.
                let (record, span) = crate::ops::track_memory(|| self.train_step())?;
                let record = record?;
                measured += 1;
                self.step_peak = Some(span.peak.max(0) as u64);
                if self.verbose && rank0 && (measured == 2 || self.step >= stop) {
                    let b = &self.plan.bytes;
                    eprintln!(
                        "memory plan per rank: weights {:.1} MB, gradients {:.1} MB, moments {:.1} MB, a step {:.1} MB \
                         (activations {:.1}, loss {:.1}, gathered {:.1}); measured in step {}: weights {:.1} MB, \
                         gradients {:.1} MB, moments {:.1} MB, a step {:.1} MB",
                        b.weights / 1e6,
                        b.gradients / 1e6,
                        b.moments / 1e6,
                        b.step / 1e6,
                        b.activations / 1e6,
                        b.loss / 1e6,
                        b.gathered / 1e6,
                        record.step,
                        self.opt.state_bytes().weights as f64 / 1e6,
                        self.opt.state_bytes().gradients as f64 / 1e6,
                        self.opt.state_bytes().moments as f64 / 1e6,
                        span.peak as f64 / 1e6,
                    );
                }
                record
            } else {
                self.train_step()?
            };
            let step = record.step;
            if (eval_every > 0 && step % eval_every == 0) || step == total {
                let _eval = profile::range("motley::eval");
                record.eval = self.evaluate()?;
                last_eval = record.eval.clone().or(last_eval);
            }
            let log_now = step % log_every == 0 || step == 1 || step == total || record.eval.is_some();
            if self.verbose && log_now && rank0 {
                eprintln!("{}", record.console_line(total));
            }
            if let Some(events) = &mut self.events {
                events.record(&record)?;
            }
            if let Some(log) = &mut self.log {
                log.append(record)?;
                if log_now {
                    log.plot(&title)?;
                }
            }
            let scheduled = (ckpt_every > 0 && step % ckpt_every == 0) || step == total || step == stop;
            if scheduled || self.stop_agreed {
                let _ckpt = profile::range("motley::checkpoint");
                self.save_checkpoint()?;
            }
            drop(step_range);
            let trace = match &mut profiler {
                Some(p) => p.after_step(step, step >= stop || self.stop_agreed)?,
                None => None,
            };
            if let (Some(trace), Some(m), Some(run)) = (&trace, &self.mirror, &self.run_dir)
                && let Ok(rel) = trace.strip_prefix(run)
            {
                // Every rank copies its own trace (nodes may not share a disk).
                m.put_run_file(&rel.to_string_lossy(), trace).map_err(TrainError::Mirror)?;
            }
            if let Some(trace) = trace
                && self.verbose
                && rank0
            {
                eprintln!(
                    "profile of steps {:?} written by every rank beside {}",
                    self.cfg.train.profile_steps,
                    trace.display()
                );
                match profile::summarize(&trace) {
                    Ok(summary) => eprint!("{}", summary.table(12)),
                    Err(e) => eprintln!("{e}"),
                }
            }
            if self.stop_agreed && step < stop {
                if self.verbose && rank0 {
                    eprintln!("asked to stop: checkpoint of step {step} written; `--resume` continues the run");
                }
                interrupted = true;
                break;
            }
        }
        // The run ends when its last checkpoint is on disk.
        let t0 = Instant::now();
        self.wait_for_checkpoint()?;
        self.checkpoint_s += t0.elapsed().as_secs_f64();
        let weights_blake3 = self.verify_replicas()?;
        let summary = TrainSummary {
            arch: self.cfg.model.arch,
            run_dir: self.run_dir.clone(),
            steps: self.step,
            skipped: self.skipped,
            tokens: self.tokens,
            wall_s: started.elapsed().as_secs_f64(),
            checkpoint_s: self.checkpoint_s,
            interrupted,
            params: self.param_count(),
            final_train: final_train_losses(self.records()),
            final_eval: last_eval,
            final_diffusion: final_diffusion_loss(self.records()),
            world: self.comm.world(),
            state_bytes: Some(self.opt.state_bytes()),
            planned_bytes: Some(self.plan.bytes),
            step_peak_bytes: self.step_peak,
            zero3: self.fsdp.as_ref().map(|f| crate::fsdp::Resident {
                peak_gathered: self.gathered_peak,
                gathered: 0,
                ..f.resident()
            }),
            weights_blake3,
        };
        if self.verbose && rank0 {
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

/// Mean per-modality loss over `batches` batches of `src`, without gradients, summed over
/// the ranks of `comm` (each evaluates its own disjoint rows).
/// Frees what ZeRO-3 gathered for a read when dropped (errors are logged: nothing to undo).
struct Gathered(Option<Arc<crate::fsdp::Fsdp>>);

impl Drop for Gathered {
    fn drop(&mut self) {
        if let Some(f) = &self.0
            && let Err(e) = f.release_all()
        {
            tracing::warn!("freeing gathered weights: {e}");
        }
    }
}

pub fn evaluate_model(
    model: &Model,
    src: &mut dyn BatchSource,
    batches: u64,
    routing: crate::model::Routing,
    device: Device,
    comm: &Comm,
) -> Result<EvalRecord, TrainError> {
    let mut sums = [0f64; 3];
    let mut tokens = [0i64; 3];
    let (mut diff_sum, mut images) = (0f64, 0f64);
    let schedule = Schedule::cosine(model.cfg.diffusion_steps as usize);
    for i in 0..batches.max(1) {
        let batch = src.next_batch()?;
        // The same noise at every evaluation: a fixed stream per held-out row.
        let noising = Noising {
            schedule: &schedule,
            policy: noise_policy(&model.cfg),
            seed: EVAL_NOISE_SEED,
            step: 0,
            fallback_stream: (comm.rank() as u64) << 48 | i << 32,
        };
        let p = Prepared::build(&model.cfg, &batch, routing, device, Some(&noising))?;
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
    comm.all_reduce_sum(&mut all)?;
    let mut r = EvalRecord::from_sums([all[0], all[1], all[2]], [all[3] as i64, all[4] as i64, all[5] as i64]);
    r.diffusion = (all[7] > 0.0).then(|| all[6] / all[7]);
    Ok(r)
}

/// Drops a row log's lines after step `keep_through` (a resumed run trains them again).
fn truncate_row_log(path: &Path, keep_through: u64) -> Result<(), TrainError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(TrainError::io("create", parent))?;
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io("read row log", path)(e)),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= keep_through)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    checkpoint::write_atomic(path, kept.as_bytes())
}

/// What every rank of a job must agree on: the resolved config (corpus paths aside: nodes
/// may mount it elsewhere), the content of each corpus manifest, the vocabulary, and this
/// build of motley.
fn run_facts(cfg: &TrainConfig, vocab: &motley_shards::Vocab) -> Result<Vec<(&'static str, String)>, TrainError> {
    let mut c = cfg.clone();
    c.data.paths.clear();
    let mut manifests = Vec::new();
    for p in &cfg.data.paths {
        let m = p.join(motley_shards::MANIFEST_NAME);
        let bytes = std::fs::read(&m).map_err(TrainError::io("read manifest", &m))?;
        manifests.push(blake3::hash(&bytes).to_hex().to_string());
    }
    Ok(vec![
        ("config", c.to_toml()?),
        ("corpus manifests (blake3)", manifests.join(", ")),
        ("vocabulary", serde_json::to_string(vocab).unwrap_or_default()),
        ("motley build", env!("CARGO_PKG_VERSION").to_string()),
    ])
}

/// Memory one rank may plan for, and how to name it: `train.device_memory` when set; on the
/// CPU, else, the machine's physical memory shared by its ranks (a run the plan puts past it
/// would die in an allocation, so it is refused at start like a stated size); on CUDA without
/// a stated size, no limit (tch does not report a device's memory).
fn memory_budget(cfg: &TrainConfig, device: Device, local_world: usize) -> (f64, String) {
    if let Some(b) = crate::plan::parse_bytes(&cfg.train.device_memory) {
        return (b, format!("train.device_memory = {}", cfg.train.device_memory));
    }
    match (device, machine_memory()) {
        (Device::Cpu, Some(total)) => {
            let ranks = local_world.max(1);
            let share = if ranks > 1 { format!(" shared by {ranks} ranks") } else { String::new() };
            (
                total / ranks as f64,
                format!(
                    "this machine's {:.3} GB{share} (plan for another size with --set train.device_memory=…)",
                    total / 1e9
                ),
            )
        }
        _ => (f64::INFINITY, String::new()),
    }
}

/// Memory this process may use, in bytes: `MemTotal` of `/proc/meminfo`, or a container's
/// cgroup v2 limit (`memory.max`) when lower, as on a Kubernetes or Slurm node with a memory
/// limit; None off Linux.
fn machine_memory() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 =
        text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|t| t.trim().parse::<f64>().ok());
    Some(limit.map_or(kib * 1024.0, |l| l.min(kib * 1024.0)))
}

/// `1 / RMS` of the latent values in the first few global micro-batches (a fresh stream, so
/// the run's own stream is untouched); 1 when they hold no latents. Every rank reads the same
/// global rows — all `batch_size × world` of each micro-batch, as one process would — so all
/// ranks, and runs on any number of ranks, agree.
fn measure_latent_scale(cfg: &TrainConfig, world: usize) -> Result<f64, TrainError> {
    let mut data = cfg.data.clone();
    data.batch_size *= world.max(1);
    let Some(mut src) = open_source(&data, cfg.train.seed, Split::Train, 0, 1)? else { return Ok(1.0) };
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
    /// Seconds of `wall_s` the loop spent checkpointing (async: the host copies, and waiting
    /// for writes; the last write included).
    #[serde(default)]
    pub checkpoint_s: f64,
    /// The run stopped before `train.steps` because it was asked to (a signal), after writing
    /// a checkpoint of its last step.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    pub params: i64,
    /// Mean train loss per modality over the last logged steps.
    pub final_train: PerModality,
    /// Held-out loss at the last evaluation.
    pub final_eval: Option<EvalRecord>,
    /// Transfusion: mean train diffusion loss over the last logged steps.
    #[serde(default)]
    pub final_diffusion: Option<f64>,
    /// Ranks that trained (data parallel).
    #[serde(default = "one")]
    pub world: usize,
    /// Bytes of weights, gradients and optimizer moments one rank held.
    #[serde(default)]
    pub state_bytes: Option<StateBytes>,
    /// `train.verify_replicas`: blake3 of the final weights, the same on every rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_blake3: Option<String>,
    /// ZeRO-3: rank 0's weight chunks, and the most it held gathered at once in a step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero3: Option<crate::fsdp::Resident>,
    /// The memory plan's bytes per rank for this run ([`crate::plan`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_bytes: Option<crate::plan::Bytes>,
    /// Bytes the first step of this process allocated at its peak, on top of what existed
    /// before it (compare with `planned_bytes.step`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_peak_bytes: Option<u64>,
}

fn one() -> usize {
    1
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
    // In a data-parallel job rank 0 prepares the folders (the others only write row logs,
    // after Trainer::new's agreement step, which rank 0 reaches once its folder is ready).
    let rank = Launch::from_env()?.rank;
    for &arch in archs {
        let mut cfg = base.clone();
        cfg.model.arch = arch;
        let dir = out.join(arch.to_string());
        if rank == 0 {
            prepare_run_dir(&dir, overwrite)?;
        }
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
    let comm = Comm::single();
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
    let r = evaluate_model(&model, src.as_mut(), batches, cfg.train.routing, device, &comm)?;
    Ok((meta.step, r))
}

/// A panic payload's message.
fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
}
