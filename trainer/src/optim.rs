//! AdamW over the VarStore's tensors, with its moments exposed for checkpoints, and the
//! warmup + cosine learning-rate schedule.
//!
//! tch's `nn::Optimizer` keeps AdamW state inside libtorch where it cannot be saved; this
//! one is PyTorch's `torch.optim.AdamW` (decoupled decay, per-parameter step counts) over flat
//! buffers laid out by [`crate::flat`]: parameters, gradients and moments each one tensor, so
//! an update is one fused kernel call per weight-decay group. Every gradient is a view of the
//! flat gradient buffer from the start (zeroed, not freed, between steps, as
//! `zero_grad(set_to_none=False)`), which the data-parallel buckets reduce in place. Under
//! ZeRO-1 ([`Sharding::zero`]) a rank keeps moments only for its chunk of each bucket: the
//! buckets are reduce-scattered into a shard gradient, the rank updates its chunks, and the
//! parameters are all-gathered. Under ZeRO-3 ([`Sharding::full_shard`]) the rank keeps only
//! its chunks of the parameters too, in the per-unit layout of [`Layout::units`]: the model's
//! tensors are empty between uses and [`crate::fsdp`] gathers them unit by unit.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::config::OptimConfig;
use crate::dist::Comm;
use crate::error::TrainError;
use crate::flat::{BucketCap, Layout, ParamInfo};
use crate::model::public_views;

/// One trainable tensor.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    /// Its moments: views of the flat moments, own tensors on the per-tensor path, None when
    /// they are sharded over ranks.
    moments: Option<(Tensor, Tensor)>,
    pub step: i64,
    pub decay: bool,
    /// Its shape (under ZeRO-3 the tensor itself is empty between uses).
    pub shape: Vec<i64>,
}

/// ZeRO-3's view of the optimizer: the layout, this rank's parameter chunks, its shard
/// gradient, and every parameter (empty between uses) with its shape.
pub type FullShardParts = (Layout, Tensor, Tensor, Vec<(String, Tensor, Vec<i64>)>);

/// How optimizer state is spread over the ranks of a job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sharding {
    pub rank: usize,
    pub world: usize,
    /// ZeRO-1: each rank keeps moments for its chunk of every bucket only.
    pub zero: bool,
    /// ZeRO-3: parameters and gradients sharded too (implies `zero`).
    pub full_shard: bool,
    /// ZeRO-3: the device the shards live on (the parameters may have been built elsewhere,
    /// in host memory; None: the parameters' device).
    pub device: Option<tch::Device>,
    pub buckets: BucketCap,
}

impl Sharding {
    /// One process, torch DDP's bucket sizes (irrelevant without communication).
    pub fn none() -> Self {
        Sharding { rank: 0, world: 1, zero: false, full_shard: false, device: None, buckets: BucketCap::ddp(25.0, 4) }
    }
}

/// The gradient buckets of the flat layout, as the data-parallel hooks need them.
#[derive(Debug)]
pub struct Buckets {
    /// Every parameter, by index.
    pub params: Vec<Tensor>,
    /// Each parameter's bucket.
    pub bucket_of: Vec<i64>,
    /// Each bucket's slice of the flat gradient buffer.
    pub grads: Vec<Tensor>,
    /// ZeRO: each bucket's chunk of this rank's shard gradient (the reduce-scatter output).
    pub shards: Option<Vec<Tensor>>,
}

/// Bytes this rank holds for training state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateBytes {
    pub weights: u64,
    pub gradients: u64,
    pub moments: u64,
}

/// The flat buffers.
#[derive(Debug)]
struct Flat {
    layout: Layout,
    rank: usize,
    zero: bool,
    /// ZeRO-3: `param` is this rank's chunks (`[shard_total]`, like the moments) and `grad` is
    /// empty; gradients arrive reduce-scattered in `shard_grad`, summed over micro-batches.
    full_shard: bool,
    param: Tensor,
    /// Every parameter's gradient is a view of this (linked at construction).
    grad: Tensor,
    /// Data pointer of each parameter's gradient view (by parameter index): the link holds
    /// while they are unchanged.
    grad_ptrs: Vec<usize>,
    /// ZeRO: this rank's reduce-scattered chunks, bucket after bucket (`[shard_total]`).
    shard_grad: Option<Tensor>,
    /// `[total]`, or `[shard_total]` under ZeRO.
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Work space for one chunk of the tensor-op update, so a step allocates nothing.
    scratch: Tensor,
    /// Update with libtorch's fused AdamW kernel (one pass); off after it fails once (then the
    /// chunked tensor-op update runs) or when a test compares the two.
    kernel: bool,
}

/// A range the update walks: parameter, gradient and moment views of equal length.
struct Piece {
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// Elements per chunk of the tensor-op update on CPU: the nine passes over a chunk stay in
/// the core's cache, so memory sees each buffer about once per step. On CUDA the whole buffer
/// is one chunk (one launch per pass).
const CPU_CHUNK: i64 = 1 << 16;

#[derive(Debug)]
pub struct AdamW {
    pub params: Vec<Param>,
    cfg: OptimConfig,
    flat: Option<Flat>,
}

/// Weight decay applies to matrices only: never to norms (1-D; stacked per tower they are
/// 2-D, so the check is on the checkpoint's per-tower tensors) or the token embedding.
pub fn decays(name: &str, t: &Tensor) -> bool {
    public_views(name, t).first().is_some_and(|(_, v)| v.dim() >= 2) && !name.starts_with("embed.")
}

/// Points `param`'s gradient at `grad` (same shape, dtype and device).
pub(crate) fn set_grad(param: &Tensor, grad: &Tensor) -> Result<(), String> {
    kernel::set_grad(param, grad)
}

impl AdamW {
    /// One process's optimizer over `vars` (a fixed order, sorted by name, so updates and
    /// checkpoints are reproducible).
    pub fn new(vars: Vec<(String, Tensor)>, cfg: &OptimConfig) -> Self {
        Self::sharded(vars, cfg, Sharding::none()).unwrap_or_else(|(opt, _)| opt)
    }

    /// The optimizer of rank `sharding.rank`. When every parameter shares one dtype and
    /// device, parameters move into flat buffers (values unchanged) and updates take the fused
    /// path; otherwise (never for motley's models) each tensor is updated alone, which is an
    /// error when the state is sharded or gradients are reduced across ranks.
    #[allow(clippy::result_large_err)] // the optimizer comes back with the error, usable as is
    pub fn sharded(
        vars: Vec<(String, Tensor)>,
        cfg: &OptimConfig,
        sharding: Sharding,
    ) -> Result<Self, (Self, TrainError)> {
        let mut params: Vec<Param> = vars
            .into_iter()
            .map(|(name, tensor)| {
                let decay = decays(&name, &tensor);
                let shape = tensor.size();
                Param { name, tensor, moments: None, step: 0, decay, shape }
            })
            .collect();
        let flat = match Self::flatten(&mut params, sharding) {
            Ok(f) => f,
            Err(e) => {
                let mut opt = AdamW { params, cfg: cfg.clone(), flat: None };
                opt.own_moments();
                return Err((opt, e));
            }
        };
        let mut opt = AdamW { params, cfg: cfg.clone(), flat };
        if opt.flat.is_none() {
            opt.own_moments();
            if sharding.world > 1 {
                return Err((
                    opt,
                    TrainError::Distributed(
                        "parameters mix dtypes or devices: data parallel needs one flat buffer".into(),
                    ),
                ));
            }
        }
        Ok(opt)
    }

    fn own_moments(&mut self) {
        for p in &mut self.params {
            p.moments = Some((p.tensor.zeros_like(), p.tensor.zeros_like()));
        }
    }

    /// Moves parameters into a flat buffer, links their gradients to views of a flat gradient
    /// buffer, and allocates the (possibly sharded) moments. None when parameters mix dtypes or
    /// devices, or there are none.
    fn flatten(params: &mut [Param], sharding: Sharding) -> Result<Option<Flat>, TrainError> {
        let Some(first) = params.first() else { return Ok(None) };
        let (kind, device) = (first.tensor.kind(), first.tensor.device());
        if params.iter().any(|p| p.tensor.kind() != kind || p.tensor.device() != device) {
            return Ok(None);
        }
        let infos: Vec<ParamInfo<'_>> = params
            .iter()
            .map(|p| ParamInfo { name: &p.name, numel: p.tensor.numel() as i64, decay: p.decay })
            .collect();
        let full_shard = sharding.full_shard;
        if full_shard {
            let layout = Layout::units(&infos, sharding.world);
            return Self::flatten_full_shard(params, layout, sharding.rank, sharding.device.unwrap_or(device))
                .map(Some);
        }
        let layout = Layout::new(&infos, sharding.world, sharding.buckets);
        let opts = (kind, device);
        let (param, grad) = (Tensor::zeros([layout.total], opts), Tensor::zeros([layout.total], opts));
        let zero = sharding.zero && sharding.world > 1;
        let moment_len = if zero { layout.shard_total() } else { layout.total };
        let (exp_avg, exp_avg_sq) = (Tensor::zeros([moment_len], opts), Tensor::zeros([moment_len], opts));
        let mut grad_ptrs = vec![0usize; params.len()];
        tch::no_grad(|| -> Result<(), TrainError> {
            for e in &layout.entries {
                let p = &mut params[e.param];
                let shape = p.tensor.size();
                let view = |t: &Tensor| t.narrow(0, e.offset, e.numel).view(shape.as_slice());
                let mut dst = view(&param);
                dst.copy_(&p.tensor);
                // set_data swaps the storage under every handle to this variable (model, VarStore).
                p.tensor.set_data(&dst);
                let g = view(&grad);
                set_grad(&p.tensor, &g).map_err(|e| TrainError::Torch {
                    op: format!("link the gradient of {}", p.name),
                    source: tch::TchError::Torch(e),
                })?;
                grad_ptrs[e.param] = g.data_ptr() as usize;
                if !zero {
                    p.moments = Some((view(&exp_avg), view(&exp_avg_sq)));
                }
            }
            Ok(())
        })?;
        let chunk = if device.is_cuda() { moment_len.max(1) } else { moment_len.clamp(1, CPU_CHUNK) };
        let scratch = Tensor::zeros([chunk], opts);
        let shard_grad = zero.then(|| Tensor::zeros([layout.shard_total()], opts));
        Ok(Some(Flat {
            layout,
            rank: sharding.rank,
            zero,
            full_shard: false,
            param,
            grad,
            grad_ptrs,
            shard_grad,
            exp_avg,
            exp_avg_sq,
            scratch,
            kernel: true,
        }))
    }

    /// ZeRO-3: this rank keeps its chunk of every unit; the parameters are left empty (the
    /// gathers of [`crate::fsdp`] fill them when a unit runs).
    fn flatten_full_shard(
        params: &mut [Param],
        layout: Layout,
        rank: usize,
        device: tch::Device,
    ) -> Result<Flat, TrainError> {
        let (kind, built_on) = (params[0].tensor.kind(), params[0].tensor.device());
        let opts = (kind, device);
        let n = layout.shard_total();
        let param = Tensor::zeros([n], opts);
        tch::no_grad(|| {
            // Empty on the compute device: `set_data` moves a variable between devices (as
            // `param.data = param.data.cuda()` does), so gathers land there.
            let empty = Tensor::empty([0], opts);
            for (b, k) in layout.buckets.iter().enumerate() {
                // The bucket whole (parameters and padding) where they were built, then this
                // rank's chunk of it on the device.
                let full = Tensor::zeros([k.len], (kind, built_on));
                for e in layout.entries.iter().filter(|e| e.bucket == b) {
                    let p = &params[e.param];
                    full.narrow(0, e.offset - k.start, e.numel).copy_(&p.tensor.reshape([-1]));
                }
                let (start, len) = layout.chunk(b, rank);
                param.narrow(0, k.shard_offset, len).copy_(&full.narrow(0, start - k.start, len));
            }
            for p in params.iter_mut() {
                p.tensor.set_data(&empty);
            }
        });
        let chunk = if device.is_cuda() { n.max(1) } else { n.clamp(1, CPU_CHUNK) };
        Ok(Flat {
            rank,
            zero: true,
            full_shard: true,
            param,
            grad: Tensor::empty([0], opts),
            grad_ptrs: Vec::new(),
            shard_grad: Some(Tensor::zeros([n], opts)),
            exp_avg: Tensor::zeros([n], opts),
            exp_avg_sq: Tensor::zeros([n], opts),
            scratch: Tensor::zeros([chunk], opts),
            kernel: true,
            layout,
        })
    }

    /// ZeRO-3: what [`crate::fsdp::Fsdp`] gathers from and reduces into — the layout, this
    /// rank's parameter chunks and shard gradient, and every parameter with its shape.
    pub fn full_shard_parts(&self) -> Option<FullShardParts> {
        let f = self.flat.as_ref().filter(|f| f.full_shard)?;
        let params = self.params.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone(), p.shape.clone())).collect();
        Some((f.layout.clone(), f.param.shallow_clone(), f.shard_grad.as_ref()?.shallow_clone(), params))
    }

    /// Whether parameters are sharded over ranks (ZeRO-3).
    pub fn is_full_shard(&self) -> bool {
        self.flat.as_ref().is_some_and(|f| f.full_shard)
    }

    /// Whether moments are sharded over ranks (ZeRO-1).
    pub fn is_sharded(&self) -> bool {
        self.flat.as_ref().is_some_and(|f| f.zero)
    }

    /// The flat layout (None on the per-tensor path).
    pub fn layout(&self) -> Option<&Layout> {
        self.flat.as_ref().map(|f| &f.layout)
    }

    /// What the gradient buckets reduce (None on the per-tensor path).
    pub fn buckets(&self) -> Option<Buckets> {
        let f = self.flat.as_ref().filter(|f| !f.full_shard)?;
        let params = self.params.iter().map(|p| p.tensor.shallow_clone()).collect();
        let bucket_of = f.layout.bucket_of(self.params.len());
        let grads = f.layout.buckets.iter().map(|b| f.grad.narrow(0, b.start, b.len)).collect();
        let shards = f.shard_grad.as_ref().map(|s| {
            let w = f.layout.world as i64;
            f.layout.buckets.iter().map(|b| s.narrow(0, b.shard_offset, b.len / w)).collect()
        });
        Some(Buckets { params, bucket_of, grads, shards })
    }

    /// The parameters as contiguous ranges (a bucket each of the flat buffer; every parameter
    /// alone on the per-tensor path), for moving them between ranks.
    pub fn param_ranges(&self) -> Vec<Tensor> {
        match &self.flat {
            Some(f) => f.layout.buckets.iter().map(|b| f.param.narrow(0, b.start, b.len)).collect(),
            None => self.params.iter().map(|p| p.tensor.detach()).collect(),
        }
    }

    /// Bytes of weights, gradients and moments this rank holds.
    pub fn state_bytes(&self) -> StateBytes {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        match &self.flat {
            Some(f) => StateBytes {
                weights: bytes(&f.param),
                gradients: bytes(&f.grad) + f.shard_grad.as_ref().map_or(0, bytes),
                moments: bytes(&f.exp_avg) + bytes(&f.exp_avg_sq),
            },
            None => {
                let w: u64 = self.params.iter().map(|p| bytes(&p.tensor)).sum();
                StateBytes { weights: w, gradients: w, moments: 2 * w }
            }
        }
    }

    /// Gradients of every parameter that received one.
    pub fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.tensor.grad()).filter(Tensor::defined).collect()
    }

    pub fn zero_grad(&mut self) {
        tch::no_grad(|| {
            if let Some(f) = &mut self.flat
                && f.full_shard
            {
                // ZeRO-3 sums reduce-scattered micro-batch gradients into the shard.
                if let Some(g) = &mut f.shard_grad {
                    let _ = g.zero_();
                }
                return;
            }
            if self.grads_linked() {
                if let Some(f) = &mut self.flat {
                    let _ = f.grad.zero_();
                }
                return;
            }
            for p in &self.params {
                let mut g = p.tensor.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
        });
    }

    /// Whether every parameter's gradient is still its view of the flat gradient buffer.
    fn grads_linked(&self) -> bool {
        let Some(f) = &self.flat else { return false };
        if f.full_shard {
            return true; // no full gradients to link: they live in fsdp's unit buffers
        }
        self.params.iter().zip(&f.grad_ptrs).all(|(p, &ptr)| {
            let g = p.tensor.grad();
            g.defined() && g.data_ptr() as usize == ptr
        })
    }

    /// Checks the gradient views are intact before the flat path reads them.
    fn flat_ready(&self) -> Result<(), TrainError> {
        if self.flat.is_some() && !self.grads_linked() {
            return Err(TrainError::Torch {
                op: "optimizer".into(),
                source: tch::TchError::Torch(
                    "a parameter's gradient was replaced: it no longer points into the flat gradient buffer".into(),
                ),
            });
        }
        Ok(())
    }

    /// Global L2 norm of the gradients: of the flat buffer (equal on every rank after an
    /// all-reduce), or of this rank's shard summed over ranks under ZeRO.
    pub fn grad_norm(&mut self, comm: &Comm) -> Result<f64, TrainError> {
        self.flat_ready()?;
        let sq = match &self.flat {
            Some(f) => {
                let g = f.shard_grad.as_ref().unwrap_or(&f.grad);
                g.norm().to_kind(Kind::Double).square()
            }
            None => {
                let norms: Vec<Tensor> =
                    self.grads().iter().map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double)).collect();
                if norms.is_empty() {
                    return Ok(0.0);
                }
                Tensor::stack(&norms, 0).sum(Kind::Double)
            }
        };
        let mut sq = [f64::try_from(sq).unwrap_or(f64::NAN)];
        if self.is_sharded() {
            comm.all_reduce_sum(&mut sq)?;
        }
        Ok(sq[0].sqrt())
    }

    /// Scales every gradient this rank updates from, in place (gradient clipping).
    pub fn scale_grads(&mut self, factor: f64) {
        tch::no_grad(|| {
            if let Some(f) = &mut self.flat {
                let g = f.shard_grad.as_mut().unwrap_or(&mut f.grad);
                *g *= factor;
                return;
            }
            for mut g in self.grads() {
                g *= factor;
            }
        });
    }

    /// One AdamW update at learning rate `lr`; under ZeRO, followed by the all-gather that
    /// gives every rank the updated parameters.
    pub fn step(&mut self, lr: f64, comm: &Comm) -> Result<(), TrainError> {
        if self.flat.is_none() {
            self.step_per_tensor(lr);
            return Ok(());
        }
        self.flat_ready()?;
        self.step_flat(lr);
        self.gather_params(comm)
    }

    /// The ranges this rank updates: the decayed prefix and the rest of the flat buffers, or
    /// under ZeRO its chunk of every bucket.
    fn pieces(f: &Flat) -> Vec<Piece> {
        let cut = |t: &Tensor, start: i64, n: i64| t.narrow(0, start, n);
        match &f.shard_grad {
            None => {
                let d = f.layout.decayed();
                [(0, d, true), (d, f.layout.total - d, false)]
                    .into_iter()
                    .filter(|&(_, n, _)| n > 0)
                    .map(|(s, n, decay)| Piece {
                        param: cut(&f.param, s, n),
                        grad: cut(&f.grad, s, n),
                        m: cut(&f.exp_avg, s, n),
                        v: cut(&f.exp_avg_sq, s, n),
                        decay,
                    })
                    .collect()
            }
            Some(sg) => (0..f.layout.buckets.len())
                .map(|b| {
                    let (start, n) = f.layout.chunk(b, f.rank);
                    let so = f.layout.buckets[b].shard_offset;
                    Piece {
                        param: cut(&f.param, if f.full_shard { so } else { start }, n),
                        grad: cut(sg, so, n),
                        m: cut(&f.exp_avg, so, n),
                        v: cut(&f.exp_avg_sq, so, n),
                        decay: f.layout.buckets[b].decay,
                    }
                })
                .filter(|p| p.param.numel() > 0)
                .collect(),
        }
    }

    /// The fused update: the per-tensor arithmetic, in the same order, on whole ranges.
    fn step_flat(&mut self, lr: f64) {
        let (b1, b2, eps, wd) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps, self.cfg.weight_decay);
        let Some(f) = &mut self.flat else { return };
        let mut step = 0;
        for p in &mut self.params {
            p.step += 1;
            step = p.step;
        }
        let pieces = Self::pieces(f);
        if f.kernel {
            let steps = Tensor::from(step as f32).to_device(f.param.device());
            // One call per weight-decay group, since decay is one number per call.
            let run = || -> Result<(), String> {
                for decay in [true, false] {
                    let group: Vec<&Piece> = pieces.iter().filter(|p| p.decay == decay).collect();
                    if group.is_empty() {
                        continue;
                    }
                    let list = |f: fn(&Piece) -> &Tensor| group.iter().map(|p| f(p)).collect::<Vec<&Tensor>>();
                    let w = if decay { wd } else { 0.0 };
                    kernel::fused_adamw(
                        &list(|p| &p.param),
                        &list(|p| &p.grad),
                        &list(|p| &p.m),
                        &list(|p| &p.v),
                        &steps,
                        (lr, b1, b2, w, eps),
                    )?;
                }
                Ok(())
            };
            match tch::no_grad(run) {
                Ok(()) => return,
                Err(e) => {
                    // Checked before any element is touched, so the chunked update below
                    // starts from the same state.
                    tracing::warn!("fused AdamW kernel unavailable, using tensor ops: {e}");
                    f.kernel = false;
                }
            }
        }
        let bc1 = 1.0 - b1.powi(step as i32);
        let bc2 = 1.0 - b2.powi(step as i32);
        let chunk = f.scratch.numel() as i64;
        tch::no_grad(|| {
            for piece in &pieces {
                let total = piece.param.numel() as i64;
                let mut start = 0;
                while start < total {
                    let n = chunk.min(total - start);
                    let cut = |t: &Tensor| t.narrow(0, start, n);
                    let mut p = cut(&piece.param);
                    if wd > 0.0 && piece.decay {
                        p *= 1.0 - lr * wd;
                    }
                    let (mut m, mut v, g) = (cut(&piece.m), cut(&piece.v), cut(&piece.grad));
                    let mut s = f.scratch.narrow(0, 0, n);
                    let _ = m.lerp_(&g, 1.0 - b1);
                    let _ = g.mul_out(&s, &g);
                    let _ = v.lerp_(&s, 1.0 - b2);
                    if lr > 0.0 {
                        // s = (sqrt(v / bc2) + eps) * bc1 / lr, so that p -= m / s.
                        let _ = v.sqrt_out(&s);
                        s *= bc1 / (lr * bc2.sqrt());
                        s += eps * bc1 / lr;
                        let _ = m.div_out(&s, &s);
                        p -= &s;
                    }
                    start += n;
                }
            }
        });
    }

    /// ZeRO: every rank's updated chunks into every rank's parameters, bucket by bucket.
    fn gather_params(&self, comm: &Comm) -> Result<(), TrainError> {
        let (Some(f), Some(group)) = (&self.flat, comm.group()) else { return Ok(()) };
        if !f.zero || f.full_shard {
            return Ok(());
        }
        let mut works = Vec::with_capacity(f.layout.buckets.len());
        let mut inputs = Vec::with_capacity(f.layout.buckets.len());
        for (b, k) in f.layout.buckets.iter().enumerate() {
            let (start, n) = f.layout.chunk(b, f.rank);
            // The input is a copy: c10d does not promise in-place all-gather on every backend.
            let input = f.param.narrow(0, start, n).copy();
            works.push(group.all_gather_into(&f.param.narrow(0, k.start, k.len), &input).map_err(|e| comm.explain(e))?);
            inputs.push(input);
        }
        for w in works {
            w.wait().map_err(|e| comm.explain(e))?;
        }
        drop(inputs);
        Ok(())
    }

    /// PyTorch's per-parameter loop; parameters without a gradient are skipped.
    fn step_per_tensor(&mut self, lr: f64) {
        let (b1, b2, eps, wd) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps, self.cfg.weight_decay);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.tensor.grad();
                let Some((m, v)) = &mut p.moments else { continue };
                if !g.defined() {
                    continue;
                }
                p.step += 1;
                if p.decay && wd > 0.0 {
                    p.tensor *= 1.0 - lr * wd;
                }
                let _ = m.lerp_(&g, 1.0 - b1);
                let _ = v.lerp_(&g.square(), 1.0 - b2);
                let bc1 = 1.0 - b1.powi(p.step as i32);
                let bc2 = 1.0 - b2.powi(p.step as i32);
                let denom = v.sqrt() / bc2.sqrt() + eps;
                p.tensor -= (&*m / denom) * (lr / bc1);
            }
        });
    }

    /// Full moment buffers `[total]` on the CPU, gathered from every rank's chunks (ZeRO;
    /// every rank takes part, only rank 0 keeps the result).
    fn gather_moments(&self, f: &Flat, comm: &Comm) -> Result<Option<(Tensor, Tensor)>, TrainError> {
        let keep = comm.rank() == 0;
        let full = || Tensor::zeros([f.layout.total], (f.exp_avg.kind(), tch::Device::Cpu));
        let (m_full, v_full) = (keep.then(full), keep.then(full));
        for (src, dst) in [(&f.exp_avg, &m_full), (&f.exp_avg_sq, &v_full)] {
            for k in &f.layout.buckets {
                let n = k.len / f.layout.world as i64;
                let mut out = Tensor::zeros([k.len], (src.kind(), src.device()));
                let input = src.narrow(0, k.shard_offset, n).copy();
                match comm.group() {
                    Some(group) => {
                        group.all_gather_into(&out, &input).and_then(|w| w.wait()).map_err(|e| comm.explain(e))?
                    }
                    // ZeRO-3 in one process: the one chunk is the bucket.
                    None if f.layout.world == 1 => {
                        tch::no_grad(|| out.copy_(&input));
                    }
                    None => return Err(TrainError::Distributed("sharded moments without a group".into())),
                }
                if let Some(d) = dst {
                    tch::no_grad(|| d.narrow(0, k.start, k.len).copy_(&out));
                }
            }
        }
        Ok(m_full.zip(v_full))
    }

    /// Named views of each parameter's part of a full-size flat buffer, per-tower names.
    fn public_flat_views(&self, f: &Flat, buffer: &Tensor) -> Vec<(usize, String, Tensor)> {
        let mut out = Vec::new();
        for e in &f.layout.entries {
            let p = &self.params[e.param];
            let t = buffer.narrow(0, e.offset, e.numel).view(p.shape.as_slice());
            for (name, view) in public_views(&p.name, &t) {
                out.push((e.param, name, view));
            }
        }
        out
    }

    /// Moments as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) and step counts,
    /// under the checkpoint's per-tower parameter names ([`public_views`]). Under ZeRO the
    /// chunks are gathered (a collective every rank must call); only rank 0 gets Some.
    #[allow(clippy::type_complexity)]
    pub fn state(&self, comm: &Comm) -> Result<Option<(Vec<(String, Tensor)>, BTreeMap<String, i64>)>, TrainError> {
        let steps = self.steps();
        let mut tensors = Vec::with_capacity(self.params.len() * 2);
        match &self.flat {
            Some(f) if f.zero => {
                let Some((m, v)) = self.gather_moments(f, comm)? else { return Ok(None) };
                for (suffix, buf) in [("exp_avg", &m), ("exp_avg_sq", &v)] {
                    for (_, name, view) in self.public_flat_views(f, buf) {
                        tensors.push((format!("{name}.{suffix}"), view));
                    }
                }
            }
            _ => {
                if comm.rank() != 0 {
                    return Ok(None);
                }
                for p in &self.params {
                    let Some((m, v)) = &p.moments else { continue };
                    for (suffix, moment) in [("exp_avg", m), ("exp_avg_sq", v)] {
                        for (name, view) in public_views(&p.name, moment) {
                            tensors.push((format!("{name}.{suffix}"), view));
                        }
                    }
                }
            }
        }
        Ok(Some((tensors, steps)))
    }

    /// Step counts under the checkpoint's per-tower names.
    pub fn steps(&self) -> BTreeMap<String, i64> {
        let mut steps = BTreeMap::new();
        for p in &self.params {
            for (name, _, _) in crate::towers::public_ranges(&p.name, &p.shape) {
                steps.insert(name, p.step);
            }
        }
        steps
    }

    /// (name, shape) of every parameter, by index: what [`crate::per_rank::pieces`] cuts.
    pub fn param_shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect()
    }

    /// This rank's place in a per-rank checkpoint: the flat layout, its rank, and the buffers
    /// its pieces are copied from. None on the per-tensor path (no flat buffers).
    pub fn rank_buffers(&self) -> Option<(&Layout, usize, crate::per_rank::RankBuffers)> {
        let f = self.flat.as_ref()?;
        Some((
            &f.layout,
            f.rank,
            crate::per_rank::RankBuffers {
                param: f.param.shallow_clone(),
                param_sharded: f.full_shard,
                exp_avg: f.exp_avg.shallow_clone(),
                exp_avg_sq: f.exp_avg_sq.shallow_clone(),
                moments_sharded: f.zero,
            },
        ))
    }

    /// The ranges of stored tensors that fill this rank's flat buffers: its own pieces when
    /// the buffer is its shard, every rank's when it is whole; with the buffer offset.
    fn fill_plan(f: &Flat, params: &[(String, Vec<i64>)], sharded: bool) -> Vec<(crate::per_rank::Piece, i64)> {
        let ranks = if sharded { f.rank..f.rank + 1 } else { 0..f.layout.world };
        ranks
            .flat_map(|r| crate::per_rank::pieces(&f.layout, params, r))
            .map(|p| {
                let at = if sharded { p.shard } else { p.flat };
                (p, at)
            })
            .collect()
    }

    /// ZeRO-3: reads this rank's chunks of the weights straight from a checkpoint (any world
    /// size, per-rank or whole files), so no rank holds the whole model. Every weight must be
    /// present with its shape; a stored weight the model lacks is an error.
    pub fn load_weight_shard(&mut self, src: &crate::per_rank::Stored) -> Result<(), TrainError> {
        let params = self.param_shapes();
        let Some(f) = self.flat.as_ref().filter(|f| f.full_shard) else {
            return Err(TrainError::Distributed("load_weight_shard without ZeRO-3".into()));
        };
        let bad = |path: std::path::PathBuf, msg: String| TrainError::Checkpoint { path, msg };
        let mut names = std::collections::BTreeSet::new();
        for (name, shape) in &params {
            for (public, _, pshape) in crate::towers::public_ranges(name, shape) {
                match src.shape(&public) {
                    None => return Err(bad(src.origin().to_path_buf(), format!("missing tensor {public}"))),
                    Some(s) if s != pshape.as_slice() => {
                        return Err(bad(
                            src.origin_of(&public),
                            format!("{public} has shape {s:?}, the model needs {pshape:?}"),
                        ));
                    }
                    Some(_) => {}
                }
                names.insert(public);
            }
        }
        if let Some(n) = src.names().find(|n| !crate::per_rank::is_moment(n) && !names.contains(*n)) {
            return Err(bad(src.origin_of(n), format!("unexpected tensor {n} (config and checkpoint disagree)")));
        }
        tch::no_grad(|| {
            for (p, at) in Self::fill_plan(f, &params, true) {
                let t = src.range(&p.name, p.start, p.len)?;
                crate::checkpoint::check_values(&p.name, &t, false).map_err(|m| bad(src.origin_of(&p.name), m))?;
                f.param.narrow(0, at, p.len).f_copy_(&t).map_err(TrainError::torch(format!("copy {}", p.name)))?;
            }
            Ok(())
        })
    }

    /// Restores moments saved by [`AdamW::state`] or a per-rank checkpoint, from any world
    /// size and sharding, reading only the ranges this rank keeps; every parameter must be
    /// present with its shape.
    pub fn load_state(
        &mut self,
        src: &crate::per_rank::Stored,
        steps: &BTreeMap<String, i64>,
    ) -> Result<(), TrainError> {
        let bad = |key: &str, what: String| TrainError::Checkpoint { path: src.origin_of(key), msg: what };
        let params = self.param_shapes();
        // Every stored tensor and step count must be one the model asks for, as for the
        // weights (torch's strict `load_state_dict`): a stray one means another model's state.
        let mut keys = std::collections::BTreeSet::new();
        for (name, shape) in &params {
            for (public, _, pshape) in crate::towers::public_ranges(name, shape) {
                for m in crate::per_rank::MOMENTS {
                    let key = format!("{public}.{m}");
                    match src.shape(&key) {
                        None => return Err(bad(&key, format!("optimizer state lacks {key}"))),
                        Some(s) if s != pshape.as_slice() => {
                            return Err(bad(&key, format!("{key} has shape {s:?}, the model needs {pshape:?}")));
                        }
                        Some(_) => {}
                    }
                    keys.insert(key);
                }
            }
        }
        if let Some(k) = src.names().find(|k| crate::per_rank::is_moment(k) && !keys.contains(*k)) {
            return Err(bad(k, format!("unexpected optimizer tensor {k} (config and checkpoint disagree)")));
        }
        let read = |key: &str, start: i64, len: i64| -> Result<Tensor, TrainError> {
            let t = src.range(key, start, len)?;
            crate::checkpoint::check_values(key, &t, key.ends_with("exp_avg_sq")).map_err(|m| bad(key, m))?;
            Ok(t)
        };
        tch::no_grad(|| -> Result<(), TrainError> {
            match &self.flat {
                Some(f) => {
                    for (p, at) in Self::fill_plan(f, &params, f.zero) {
                        for (m, dst) in crate::per_rank::MOMENTS.iter().zip([&f.exp_avg, &f.exp_avg_sq]) {
                            let key = format!("{}.{m}", p.name);
                            let t = read(&key, p.start, p.len)?;
                            dst.narrow(0, at, p.len).f_copy_(&t).map_err(TrainError::torch(format!("copy {key}")))?;
                        }
                    }
                }
                None => {
                    for p in &self.params {
                        let Some((m, v)) = &p.moments else { continue };
                        for (suffix, moment) in [("exp_avg", m), ("exp_avg_sq", v)] {
                            // Views of the moment: copying into them fills it.
                            for (name, mut dst) in public_views(&p.name, moment) {
                                let key = format!("{name}.{suffix}");
                                let t = read(&key, 0, dst.numel() as i64)?;
                                dst.f_copy_(&t.view(dst.size().as_slice()))
                                    .map_err(TrainError::torch(format!("copy {key}")))?;
                            }
                        }
                    }
                }
            }
            Ok(())
        })?;
        // Step counts come from meta.json, beside the tensor files.
        let origin = src.origin().with_file_name(crate::checkpoint::META_FILE);
        let missing = |what: String| TrainError::Checkpoint { path: origin.clone(), msg: what };
        for p in &mut self.params {
            // One step count per stored tensor; the parts of a stacked one must agree.
            let mut step = None;
            for (name, _, _) in crate::towers::public_ranges(&p.name, &p.shape) {
                let s = *steps.get(&name).ok_or_else(|| missing(format!("optimizer steps lack {name}")))?;
                if step.is_some_and(|prev| prev != s) {
                    return Err(missing(format!("step counts differ within {} ({name}: {s})", p.name)));
                }
                step = Some(s);
            }
            p.step = step.unwrap_or(0);
        }
        let names: std::collections::BTreeSet<String> = self
            .params
            .iter()
            .flat_map(|p| crate::towers::public_ranges(&p.name, &p.shape).into_iter().map(|(n, _, _)| n))
            .collect();
        if let Some(k) = steps.keys().find(|k| !names.contains(*k)) {
            return Err(missing(format!("meta.json's optimizer_steps name {k}, which the model does not have")));
        }
        Ok(())
    }
}

/// The C++ shim around `at::_fused_adamw_` (trainer/csrc/fused_adamw.cpp).
mod kernel {
    use std::ffi::c_char;

    use tch::Tensor;
    use torch_sys::C_tensor;

    use crate::ops::take_string;

    unsafe extern "C" {
        fn motley_fused_adamw(
            params: *const *const C_tensor,
            grads: *const *const C_tensor,
            exp_avgs: *const *const C_tensor,
            exp_avg_sqs: *const *const C_tensor,
            n: usize,
            step: *const C_tensor,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
        ) -> *mut c_char;
        fn motley_set_grad(param: *const C_tensor, grad: *const C_tensor) -> *mut c_char;
    }

    /// One in-place AdamW step of each parameter in `params` and its moments (PyTorch's
    /// formula; `step` is the step count after this update, a 0-dim fp32 tensor on the
    /// parameters' device). `hyper`: (lr, beta1, beta2, weight decay, eps).
    pub(super) fn fused_adamw(
        params: &[&Tensor],
        grads: &[&Tensor],
        exp_avgs: &[&Tensor],
        exp_avg_sqs: &[&Tensor],
        step: &Tensor,
        hyper: (f64, f64, f64, f64, f64),
    ) -> Result<(), String> {
        let n = params.len();
        if [grads.len(), exp_avgs.len(), exp_avg_sqs.len()].iter().any(|&l| l != n) {
            return Err("fused AdamW: lists of different lengths".into());
        }
        let ptrs = |l: &[&Tensor]| l.iter().map(|t| t.as_ptr()).collect::<Vec<_>>();
        let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
        let (lr, beta1, beta2, weight_decay, eps) = hyper;
        // SAFETY: every pointer is a live tensor handle borrowed for the call; the shim catches
        // every C++ exception and returns its message, which we copy and free.
        unsafe {
            let err = motley_fused_adamw(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                n,
                step.as_ptr(),
                lr,
                beta1,
                beta2,
                weight_decay,
                eps,
            );
            match take_string(err) {
                None => Ok(()),
                Some(msg) => Err(msg.lines().next().unwrap_or_default().to_string()),
            }
        }
    }

    /// `param.grad = grad` (tch binds no setter for a gradient; an undefined `grad` clears it).
    pub(crate) fn set_grad(param: &Tensor, grad: &Tensor) -> Result<(), String> {
        // SAFETY: two live tensor handles borrowed for the call; errors come back as a message.
        unsafe {
            match take_string(motley_set_grad(param.as_ptr(), grad.as_ptr())) {
                None => Ok(()),
                Some(msg) => Err(msg.lines().next().unwrap_or_default().to_string()),
            }
        }
    }
}

/// Linear warmup from 0 to `lr` over `warmup_steps`, then cosine down to `min_lr` at `total`.
/// `step` counts from 1 (the first update).
pub fn learning_rate(cfg: &OptimConfig, step: u64, total: u64) -> f64 {
    if cfg.warmup_steps > 0 && step <= cfg.warmup_steps {
        return cfg.lr * step as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step.saturating_sub(cfg.warmup_steps)) as f64 / span).min(1.0);
    cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let cfg = OptimConfig { lr: 1.0, min_lr: 0.1, warmup_steps: 10, ..OptimConfig::default() };
        assert!((learning_rate(&cfg, 5, 100) - 0.5).abs() < 1e-12);
        assert!((learning_rate(&cfg, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 55, 100) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&cfg, 100, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&cfg, 200, 100) - 0.1).abs() < 1e-12);
    }

    /// Three parameters (a decayed matrix, a norm vector, an embedding) and their gradients.
    fn toy() -> Vec<(String, Tensor)> {
        let t = |v: &[f32], shape: &[i64]| Tensor::from_slice(v).view(shape).set_requires_grad(true);
        vec![
            ("embed.weight".into(), t(&[0.1, -0.2, 0.3, 0.4], &[2, 2])),
            ("layers.0.attn.q_proj.image.weight".into(), t(&[1.0, -2.0, 0.5, 0.25, -0.75, 2.0], &[2, 3])),
            ("layers.0.attn_norm.image.weight".into(), t(&[1.0, 1.0, 1.0], &[3])),
        ]
    }

    fn train(fused: bool, drop_grad_at: Option<usize>) -> Vec<Vec<f32>> {
        train_with(fused, true, drop_grad_at)
    }

    /// `kernel`: the flat update through libtorch's fused kernel, else the chunked tensor ops.
    fn train_with(fused: bool, kernel: bool, drop_grad_at: Option<usize>) -> Vec<Vec<f32>> {
        let vars = toy();
        let cfg = OptimConfig { weight_decay: 0.1, ..OptimConfig::default() };
        let mut opt = AdamW::new(vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), &cfg);
        if !fused {
            opt.flat = None;
        }
        if let Some(f) = &mut opt.flat {
            f.kernel = kernel;
        }
        for step in 0..4 {
            opt.zero_grad();
            let mut loss = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
            for (i, (_, t)) in vars.iter().enumerate() {
                if drop_grad_at == Some(step) && i == 1 {
                    continue;
                }
                loss += (t * t * (step as f64 + 1.0) + t.sin()).sum(Kind::Float);
            }
            loss.backward();
            let norm = opt.grad_norm(&Comm::single()).expect("norm");
            opt.scale_grads(0.5 / (norm + 1e-6));
            opt.step(0.01, &Comm::single()).expect("step");
        }
        if let Some(f) = &opt.flat {
            assert_eq!(f.kernel, kernel, "the fused kernel ran every step (no silent fallback)");
        }
        vars.iter().map(|(_, t)| Vec::<f32>::try_from(t.detach().view([-1])).expect("values")).collect()
    }

    #[test]
    fn fused_update_equals_per_tensor_update() {
        let a = train(true, None);
        let b = train(false, None);
        for (x, y) in a.iter().zip(&b) {
            for (u, v) in x.iter().zip(y) {
                assert!((u - v).abs() <= 1e-6 * v.abs().max(1.0), "{a:?} vs {b:?}");
            }
        }
        // A parameter without a gradient is skipped (moments untouched), fused or not.
        let a = train(true, Some(1));
        let b = train(false, Some(1));
        for (x, y) in a.iter().zip(&b) {
            for (u, v) in x.iter().zip(y) {
                assert!((u - v).abs() <= 1e-6 * v.abs().max(1.0), "{a:?} vs {b:?}");
            }
        }
        let moved = train(true, None);
        assert_ne!(moved[1], train(true, Some(1))[1], "skipping a gradient changes the result");
    }

    #[test]
    fn fused_kernel_equals_chunked_tensor_ops() {
        let a = train_with(true, true, None);
        let b = train_with(true, false, None);
        for (x, y) in a.iter().zip(&b) {
            for (u, v) in x.iter().zip(y) {
                assert!((u - v).abs() <= 1e-6 * v.abs().max(1.0), "{a:?} vs {b:?}");
            }
        }
        assert_ne!(
            a,
            toy().iter().map(|(_, t)| Vec::<f32>::try_from(t.view([-1])).expect("values")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn fused_parameters_stay_the_model_s_tensors() {
        let vars = toy();
        let opt =
            AdamW::new(vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), &OptimConfig::default());
        let flat = opt.flat.as_ref().expect("one dtype and device: fused");
        // Decayed matrix first (6, padded to 8), then the norm (3) and the embedding (4) in
        // backward order, padded to 8.
        assert_eq!(flat.param.numel(), 16);
        let order: Vec<usize> = flat.layout.entries.iter().map(|e| e.param).collect();
        assert_eq!(order, vec![1, 2, 0]);
        assert_eq!(flat.layout.decayed(), 8);
        let q: Vec<f32> = Vec::try_from(vars[1].1.detach().view([-1])).expect("values");
        assert_eq!(q, vec![1.0, -2.0, 0.5, 0.25, -0.75, 2.0], "values survive the move");
        let head: Vec<f32> = Vec::try_from(flat.param.narrow(0, 0, 6)).expect("values");
        assert_eq!(head, q, "the model's tensor is a view of the flat buffer");
    }

    #[test]
    fn gradients_accumulate_into_the_flat_buffer() {
        let vars = toy();
        let mut opt =
            AdamW::new(vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), &OptimConfig::default());
        let backward = |scale: f64| {
            let mut loss = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
            for (_, t) in &vars {
                loss += (t * t).sum(Kind::Float) * scale;
            }
            loss.backward();
        };
        assert!(opt.grads_linked(), "linked before any backward");
        backward(1.0);
        assert!(opt.grads_linked(), "backward accumulated in place");
        opt.zero_grad();
        backward(1.0);
        backward(2.0); // accumulation (two micro-batches) lands in the buffer too
        assert!(opt.grads_linked());
        let f = opt.flat.as_ref().expect("fused");
        let flat: Vec<f32> = Vec::try_from(f.grad.shallow_clone()).expect("values");
        let mut want = vec![0f32; 16];
        for e in &f.layout.entries {
            let g: Vec<f32> = Vec::try_from(vars[e.param].1.detach().view([-1]) * 6.0).expect("values");
            want[e.offset as usize..e.offset as usize + g.len()].copy_from_slice(&g);
        }
        assert_eq!(flat, want, "d/dt 3 t^2 = 6 t, in flat order, zeros in the padding");
    }

    #[test]
    fn sharded_layout_splits_moments_and_gradient_chunks() {
        // Two ranks' optimizers over the same parameters, without communication: each owns
        // half of every bucket; their state bytes halve the moments.
        let build = |rank| {
            let vars = toy();
            let sharding = Sharding {
                rank,
                world: 2,
                zero: true,
                full_shard: false,
                device: None,
                buckets: BucketCap { first: 8, rest: 8 },
            };
            AdamW::sharded(vars.into_iter().collect(), &OptimConfig::default(), sharding).expect("sharded")
        };
        let (a, b) = (build(0), build(1));
        assert!(a.is_sharded());
        let full = AdamW::new(toy(), &OptimConfig::default());
        assert_eq!(a.state_bytes().moments * 2, full.state_bytes().moments);
        assert_eq!(a.state_bytes().weights, full.state_bytes().weights);
        let k = a.buckets().expect("flat");
        assert_eq!((k.params.len(), k.bucket_of.len()), (3, 3));
        let shards = k.shards.expect("ZeRO shards");
        for (g, s) in k.grads.iter().zip(&shards) {
            assert_eq!(g.numel(), 2 * s.numel(), "each rank's chunk is half a bucket");
        }
        // The two ranks update complementary halves of every bucket.
        let ranges = |o: &AdamW| -> Vec<(i64, i64)> {
            let f = o.flat.as_ref().expect("flat");
            let base = f.param.data_ptr() as i64;
            AdamW::pieces(f).iter().map(|p| ((p.param.data_ptr() as i64 - base) / 4, p.param.numel() as i64)).collect()
        };
        let (ra, rb) = (ranges(&a), ranges(&b));
        let layout = a.layout().expect("layout");
        assert_eq!(ra.len(), layout.buckets.len());
        for (i, (x, y)) in ra.iter().zip(&rb).enumerate() {
            let bucket = &layout.buckets[i];
            assert_eq!((x.0, y.0), (bucket.start, bucket.start + bucket.len / 2), "bucket {i}");
            assert_eq!(x.1 + y.1, bucket.len);
        }
    }

    #[test]
    fn state_of_stacked_parameters_is_per_tower_and_round_trips() {
        let t = |v: &[f32], shape: &[i64]| Tensor::from_slice(v).view(shape).set_requires_grad(true);
        let vars = || {
            vec![
                ("layers.0.attn_norm.stacked".to_string(), t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2])),
                ("layers.0.attn.q_proj.weight".to_string(), t(&[0.5, -0.5], &[1, 2])),
            ]
        };
        let mut opt = AdamW::new(vars(), &OptimConfig::default());
        // Stacked norms are 2-D but still norms: no decay.
        assert!(opt.params.iter().all(|p| p.decay == (p.name == "layers.0.attn.q_proj.weight")));
        tch::no_grad(|| {
            for (i, p) in opt.params.iter_mut().enumerate() {
                let _ = p.moments.as_mut().expect("moments").0.fill_(i as f64 + 0.5);
                p.step = 7;
            }
        });
        let (tensors, steps) = opt.state(&Comm::single()).expect("state").expect("rank 0");
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"layers.0.attn_norm.speech.weight.exp_avg_sq"), "{names:?}");
        assert_eq!(tensors.len(), 2 * (3 + 1));
        assert_eq!(steps.get("layers.0.attn_norm.image.weight"), Some(&7));
        // Through the files a checkpoint holds, read back a range at a time.
        let dir = tempfile::tempdir().expect("tempdir");
        let copies = |v: Vec<(String, Tensor)>| -> Vec<(String, Tensor)> {
            v.into_iter().map(|(n, t)| (n, t.detach().contiguous().copy())).collect()
        };
        let weights: Vec<(String, Tensor)> = vars().iter().flat_map(|(n, t)| public_views(n, t)).collect();
        Tensor::write_safetensors(&copies(weights), dir.path().join("model.safetensors")).expect("weights");
        Tensor::write_safetensors(&copies(tensors), dir.path().join("optimizer.safetensors")).expect("moments");
        let stored = crate::per_rank::Stored::open(dir.path(), true).expect("open");
        let mut fresh = AdamW::new(vars(), &OptimConfig::default());
        fresh.load_state(&stored, &steps).expect("round trip");
        for (a, b) in opt.params.iter().zip(&fresh.params) {
            let (ma, mb) = (a.moments.as_ref().expect("moments"), b.moments.as_ref().expect("moments"));
            assert!(ma.0.equal(&mb.0) && a.step == b.step, "{}", a.name);
        }
        // The towers of one stacked tensor share a step count: disagreeing ones are an error.
        let mut bad = steps.clone();
        bad.insert("layers.0.attn_norm.image.weight".into(), 6);
        let err = fresh.load_state(&stored, &bad).expect_err("steps differ");
        assert!(err.to_string().contains("step counts differ within layers.0.attn_norm.stacked"), "{err}");
    }

    #[test]
    fn matches_reference_adamw_update() {
        // Two steps by hand for one scalar-per-entry parameter, as torch.optim.AdamW computes.
        let cfg = OptimConfig { weight_decay: 0.1, eps: 1e-8, ..OptimConfig::default() };
        let w = Tensor::from_slice(&[1.0f64, -2.0]).view([1, 2]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], &cfg);
        let grads = [[0.5f64, -1.0], [0.25, 0.75]];
        let (mut m, mut v, mut x) = ([0.0f64; 2], [0.0f64; 2], [1.0f64, -2.0]);
        for (t, g) in grads.iter().enumerate() {
            opt.zero_grad();
            (&w * Tensor::from_slice(g).view([1, 2])).sum(Kind::Double).backward();
            opt.step(0.01, &Comm::single()).expect("step");
            let t = (t + 1) as i32;
            for i in 0..2 {
                x[i] *= 1.0 - 0.01 * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.95 * v[i] + 0.05 * g[i] * g[i];
                let denom = (v[i] / (1.0 - 0.95f64.powi(t))).sqrt() + 1e-8;
                x[i] -= 0.01 / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
            }
        }
        assert!(opt.flat.as_ref().is_some_and(|f| f.kernel), "checked through the fused kernel");
        let got: Vec<f64> = Vec::try_from(w.detach().view([2])).expect("values");
        for i in 0..2 {
            assert!((got[i] - x[i]).abs() < 1e-12, "{got:?} vs {x:?}");
        }
        assert!(!decays("embed.weight", &w));
        assert!(!decays("layers.0.attn_norm.text.weight", &Tensor::zeros([4], (Kind::Float, tch::Device::Cpu))));
        assert!(decays("layers.0.attn.q_proj.text.weight", &w));
    }
}
