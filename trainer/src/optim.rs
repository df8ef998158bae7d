//! AdamW over the VarStore's tensors, with its moments exposed for checkpoints, and the
//! warmup + cosine learning-rate schedule.
//!
//! tch's `nn::Optimizer` keeps AdamW state inside libtorch where it cannot be saved; this
//! one is PyTorch's `torch.optim.AdamW` (decoupled decay, per-parameter step counts,
//! parameters without a gradient left untouched) written with no-grad tensor ops.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::config::OptimConfig;
use crate::error::TrainError;
use crate::model::public_views;

/// One trainable tensor and its moments.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub step: i64,
    pub decay: bool,
}

/// Flat copies of every parameter and moment, so one AdamW update is a dozen whole-model ops
/// instead of a dozen per tensor (MoT has three times the tensors of dense, and on CUDA the
/// per-tensor launches dominate the update). Parameters are re-pointed at views of `param`,
/// so the model, the VarStore and checkpoints keep seeing ordinary named tensors.
#[derive(Debug)]
struct Flat {
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Parameter indices in flat order: decayed ones first, so decay is one narrow view.
    order: Vec<usize>,
    /// Elements in the decayed prefix.
    n_decay: i64,
    /// Every gradient in flat order. Built by one concatenation the first time every
    /// parameter has a gradient; from then on each parameter's gradient is re-pointed at its
    /// view here, so backward accumulates straight into it and `zero_grad` is one fill.
    grad: Option<Tensor>,
    /// `grad` is live only while every parameter's gradient still starts at these addresses.
    grad_ptrs: Vec<usize>,
    /// Work space for one chunk of the update, so a step allocates nothing.
    scratch: Tensor,
    /// Update with libtorch's fused AdamW kernel (one pass); off after it fails once (then the
    /// chunked tensor-op update runs) or when a test compares the two.
    kernel: bool,
}

/// Elements per chunk of the fused update on CPU: the nine passes over a chunk stay in the
/// core's cache, so memory sees each buffer about once per step. On CUDA the whole buffer is
/// one chunk (one launch per pass).
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

impl AdamW {
    /// `vars` in a fixed order (sorted by name) so updates and checkpoints are reproducible.
    /// When every parameter shares one dtype and device, parameters and moments move into
    /// flat buffers (values unchanged) and updates take the fused path.
    pub fn new(vars: Vec<(String, Tensor)>, cfg: &OptimConfig) -> Self {
        let mut params: Vec<Param> = vars
            .into_iter()
            .map(|(name, tensor)| {
                let decay = decays(&name, &tensor);
                Param { exp_avg: tensor.zeros_like(), exp_avg_sq: tensor.zeros_like(), name, tensor, step: 0, decay }
            })
            .collect();
        let flat = Self::flatten(&mut params);
        AdamW { params, cfg: cfg.clone(), flat }
    }

    /// Moves parameters and moments into flat buffers; None (per-tensor updates) when the
    /// parameters mix dtypes or devices, or there are none.
    fn flatten(params: &mut [Param]) -> Option<Flat> {
        let first = params.first()?;
        let (kind, device) = (first.tensor.kind(), first.tensor.device());
        if params.iter().any(|p| p.tensor.kind() != kind || p.tensor.device() != device) {
            return None;
        }
        let mut order: Vec<usize> = (0..params.len()).collect();
        order.sort_by_key(|&i| !params[i].decay); // stable: decayed first, name order within
        let total: i64 = params.iter().map(|p| p.tensor.numel() as i64).sum();
        let n_decay: i64 = params.iter().filter(|p| p.decay).map(|p| p.tensor.numel() as i64).sum();
        let opts = (kind, device);
        let (param, exp_avg, exp_avg_sq) =
            (Tensor::zeros([total], opts), Tensor::zeros([total], opts), Tensor::zeros([total], opts));
        let mut off = 0;
        tch::no_grad(|| {
            for &i in &order {
                let p = &mut params[i];
                let (n, shape) = (p.tensor.numel() as i64, p.tensor.size());
                let view = |t: &Tensor| t.narrow(0, off, n).view(shape.as_slice());
                let mut dst = view(&param);
                dst.copy_(&p.tensor);
                // set_data swaps the storage under every handle to this variable (model, VarStore).
                p.tensor.set_data(&dst);
                p.exp_avg = view(&exp_avg);
                p.exp_avg_sq = view(&exp_avg_sq);
                off += n;
            }
        });
        let chunk = if device.is_cuda() { total } else { total.min(CPU_CHUNK) };
        let scratch = Tensor::zeros([chunk], opts);
        Some(Flat {
            param,
            exp_avg,
            exp_avg_sq,
            order,
            n_decay,
            grad: None,
            grad_ptrs: Vec::new(),
            scratch,
            kernel: true,
        })
    }

    /// Gradients of every parameter that received one.
    pub fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.tensor.grad()).filter(Tensor::defined).collect()
    }

    pub fn zero_grad(&mut self) {
        if self.flat_grad_is_live() {
            if let Some(g) = self.flat.as_mut().and_then(|f| f.grad.as_mut()) {
                let _ = g.zero_();
            }
            return;
        }
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// Whether every parameter's gradient is still its view of the flat gradient buffer.
    fn flat_grad_is_live(&self) -> bool {
        let Some(f) = &self.flat else { return false };
        f.grad.is_some()
            && f.grad_ptrs.len() == f.order.len()
            && f.order.iter().zip(&f.grad_ptrs).all(|(&i, &ptr)| {
                let g = self.params[i].tensor.grad();
                g.defined() && g.data_ptr() as usize == ptr
            })
    }

    /// The flat gradient, built on first use in a step. None when the fused path cannot take
    /// this step: a parameter got no gradient (PyTorch leaves such a parameter and its moments
    /// untouched, which the per-tensor path does) or step counts differ for the same reason.
    fn flat_grad(&mut self) -> Option<&Tensor> {
        if !self.flat_grad_is_live() {
            let f = self.flat.as_mut()?;
            let step0 = self.params.first().map(|p| p.step)?;
            let mut grads = Vec::with_capacity(f.order.len());
            for &i in &f.order {
                let p = &self.params[i];
                let g = p.tensor.grad();
                if !g.defined() || p.step != step0 || g.kind() != f.param.kind() || g.size() != p.tensor.size() {
                    f.grad = None;
                    return None;
                }
                grads.push(g);
            }
            let flat = tch::no_grad(|| Tensor::cat(&grads.iter().map(|g| g.view([-1])).collect::<Vec<_>>(), 0));
            // Re-point each gradient at its view: set_data swaps the storage under the
            // gradient autograd holds, which accumulates in place from the next backward on.
            let mut off = 0;
            f.grad_ptrs.clear();
            for g in &mut grads {
                let n = g.numel() as i64;
                let view = flat.narrow(0, off, n).view(g.size().as_slice());
                g.set_data(&view);
                f.grad_ptrs.push(g.data_ptr() as usize);
                off += n;
            }
            f.grad = Some(flat);
        }
        self.flat.as_ref()?.grad.as_ref()
    }

    /// Global L2 norm of all gradients (one value read back to the host).
    pub fn grad_norm(&mut self) -> f64 {
        let sq = match self.flat_grad() {
            // One pass, no temporary.
            Some(g) => g.norm().to_kind(Kind::Double).square(),
            None => {
                let norms: Vec<Tensor> =
                    self.grads().iter().map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float)).collect();
                if norms.is_empty() {
                    return 0.0;
                }
                Tensor::stack(&norms, 0).sum(Kind::Float)
            }
        };
        f64::try_from(sq.sqrt()).unwrap_or(f64::NAN)
    }

    /// Scales every gradient in place (gradient clipping).
    pub fn scale_grads(&mut self, factor: f64) {
        tch::no_grad(|| {
            if let Some(f) = &mut self.flat
                && let Some(g) = &mut f.grad
            {
                *g *= factor;
                return;
            }
            for mut g in self.grads() {
                g *= factor;
            }
        });
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        if self.flat_grad().is_some() {
            self.step_flat(lr);
        } else {
            self.step_per_tensor(lr);
        }
    }

    /// The fused update: the per-tensor arithmetic, in the same order, on whole flat buffers.
    fn step_flat(&mut self, lr: f64) {
        let (b1, b2, eps, wd) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps, self.cfg.weight_decay);
        let Some(f) = &mut self.flat else { return };
        let Some(g) = &f.grad else { return };
        let mut step = 0;
        for p in &mut self.params {
            p.step += 1;
            step = p.step;
        }
        let total = f.param.numel() as i64;
        if f.kernel {
            let steps = Tensor::from(step as f32).to_device(f.param.device());
            // Decayed prefix and the rest: two calls, since weight decay is one number per call.
            let parts = [(0, f.n_decay, wd), (f.n_decay, total - f.n_decay, 0.0)];
            let run = || -> Result<(), String> {
                for (start, n, decay) in parts {
                    if n > 0 {
                        let cut = |t: &Tensor| t.narrow(0, start, n);
                        let (p, g, m, v) = (cut(&f.param), cut(g), cut(&f.exp_avg), cut(&f.exp_avg_sq));
                        kernel::fused_adamw(&p, &g, &m, &v, &steps, lr, b1, b2, decay, eps)?;
                    }
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
            let mut start = 0;
            while start < total {
                let n = chunk.min(total - start);
                let cut = |t: &Tensor| t.narrow(0, start, n);
                let decayed = (f.n_decay - start).clamp(0, n);
                let mut p = cut(&f.param);
                if wd > 0.0 && decayed > 0 {
                    let mut d = p.narrow(0, 0, decayed);
                    d *= 1.0 - lr * wd;
                }
                let (mut m, mut v, g) = (cut(&f.exp_avg), cut(&f.exp_avg_sq), cut(g));
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
        });
    }

    /// PyTorch's per-parameter loop; parameters without a gradient are skipped.
    fn step_per_tensor(&mut self, lr: f64) {
        let (b1, b2, eps, wd) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps, self.cfg.weight_decay);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.tensor.grad();
                if !g.defined() {
                    continue;
                }
                p.step += 1;
                if p.decay && wd > 0.0 {
                    p.tensor *= 1.0 - lr * wd;
                }
                let _ = p.exp_avg.lerp_(&g, 1.0 - b1);
                let _ = p.exp_avg_sq.lerp_(&g.square(), 1.0 - b2);
                let bc1 = 1.0 - b1.powi(p.step as i32);
                let bc2 = 1.0 - b2.powi(p.step as i32);
                let denom = p.exp_avg_sq.sqrt() / bc2.sqrt() + eps;
                p.tensor -= (&p.exp_avg / denom) * (lr / bc1);
            }
        });
    }

    /// Moments as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) and step counts,
    /// under the checkpoint's per-tower parameter names ([`public_views`]).
    pub fn state(&self) -> (Vec<(String, Tensor)>, BTreeMap<String, i64>) {
        let mut tensors = Vec::with_capacity(self.params.len() * 2);
        let mut steps = BTreeMap::new();
        for p in &self.params {
            for (suffix, moment) in [("exp_avg", &p.exp_avg), ("exp_avg_sq", &p.exp_avg_sq)] {
                for (name, view) in public_views(&p.name, moment) {
                    tensors.push((format!("{name}.{suffix}"), view));
                }
            }
            for (name, _) in public_views(&p.name, &p.tensor) {
                steps.insert(name, p.step);
            }
        }
        (tensors, steps)
    }

    /// Restores moments saved by [`AdamW::state`]; every parameter must be present with its shape.
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        steps: &BTreeMap<String, i64>,
        origin: &std::path::Path,
    ) -> Result<(), TrainError> {
        let missing = |what: String| TrainError::Checkpoint { path: origin.to_path_buf(), msg: what };
        tch::no_grad(|| {
            for p in &mut self.params {
                for (suffix, moment) in [("exp_avg", &p.exp_avg), ("exp_avg_sq", &p.exp_avg_sq)] {
                    // Views of the moment: copying into them fills it.
                    for (name, mut dst) in public_views(&p.name, moment) {
                        let key = format!("{name}.{suffix}");
                        let src = tensors.get(&key).ok_or_else(|| missing(format!("optimizer state lacks {key}")))?;
                        if src.size() != dst.size() {
                            return Err(missing(format!(
                                "{key} has shape {:?}, the model needs {:?}",
                                src.size(),
                                dst.size()
                            )));
                        }
                        dst.f_copy_(src).map_err(TrainError::torch(format!("copy {key}")))?;
                    }
                }
                // One step count per stored tensor; the parts of a stacked one must agree.
                let mut step = None;
                for (name, _) in public_views(&p.name, &p.tensor) {
                    let s = *steps.get(&name).ok_or_else(|| missing(format!("optimizer steps lack {name}")))?;
                    if step.is_some_and(|prev| prev != s) {
                        return Err(missing(format!("step counts differ within {} ({name}: {s})", p.name)));
                    }
                    step = Some(s);
                }
                p.step = step.unwrap_or(0);
            }
            Ok(())
        })
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
            param: *const C_tensor,
            grad: *const C_tensor,
            exp_avg: *const C_tensor,
            exp_avg_sq: *const C_tensor,
            step: *const C_tensor,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
        ) -> *mut c_char;
    }

    /// One in-place AdamW step of `param` and its moments (PyTorch's formula; `step` is the
    /// step count after this update, a 0-dim fp32 tensor on the parameters' device).
    #[allow(clippy::too_many_arguments)] // the kernel's own argument list
    pub(super) fn fused_adamw(
        param: &Tensor,
        grad: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        step: &Tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> Result<(), String> {
        // SAFETY: every pointer is a live tensor handle borrowed for the call; the shim catches
        // every C++ exception and returns its message, which we copy and free.
        unsafe {
            let err = motley_fused_adamw(
                param.as_ptr(),
                grad.as_ptr(),
                exp_avg.as_ptr(),
                exp_avg_sq.as_ptr(),
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
            let norm = opt.grad_norm();
            opt.scale_grads(0.5 / (norm + 1e-6));
            opt.step(0.01);
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
        assert_eq!(flat.param.numel(), 13);
        // Decayed matrix first, then the rest in name order.
        assert_eq!(flat.order, vec![1, 0, 2]);
        assert_eq!(flat.n_decay, 6);
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
        backward(1.0);
        assert!(!opt.flat_grad_is_live(), "autograd's own gradients before the first step");
        opt.grad_norm();
        assert!(opt.flat_grad_is_live(), "linked at the first use");
        opt.zero_grad();
        backward(1.0);
        backward(2.0); // accumulation (two micro-batches) lands in the buffer too
        assert!(opt.flat_grad_is_live());
        let flat: Vec<f32> = Vec::try_from(opt.flat_grad().expect("fused").shallow_clone()).expect("values");
        let want: Vec<f32> = opt
            .flat
            .as_ref()
            .map(|f| f.order.clone())
            .unwrap_or_default()
            .iter()
            .flat_map(|&i| Vec::<f32>::try_from(vars[i].1.detach().view([-1]) * 6.0).expect("values"))
            .collect();
        assert_eq!(flat, want, "d/dt 3 t^2 = 6 t, in flat order");
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
                let _ = p.exp_avg.fill_(i as f64 + 0.5);
                p.step = 7;
            }
        });
        let (tensors, steps) = opt.state();
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"layers.0.attn_norm.speech.weight.exp_avg_sq"), "{names:?}");
        assert_eq!(tensors.len(), 2 * (3 + 1));
        assert_eq!(steps.get("layers.0.attn_norm.image.weight"), Some(&7));
        let tensors: BTreeMap<String, Tensor> = tensors.into_iter().map(|(n, v)| (n, v.copy())).collect();
        let origin = std::path::Path::new("optimizer.safetensors");
        let mut fresh = AdamW::new(vars(), &OptimConfig::default());
        fresh.load_state(&tensors, &steps, origin).expect("round trip");
        for (a, b) in opt.params.iter().zip(&fresh.params) {
            assert!(a.exp_avg.equal(&b.exp_avg) && a.step == b.step, "{}", a.name);
        }
        // The towers of one stacked tensor share a step count: disagreeing ones are an error.
        let mut bad = steps.clone();
        bad.insert("layers.0.attn_norm.image.weight".into(), 6);
        let err = fresh.load_state(&tensors, &bad, origin).expect_err("steps differ");
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
            opt.step(0.01);
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
