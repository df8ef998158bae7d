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

#[derive(Debug)]
pub struct AdamW {
    pub params: Vec<Param>,
    cfg: OptimConfig,
}

/// Weight decay applies to matrices only: never to norms (1-D) or the token embedding.
pub fn decays(name: &str, t: &Tensor) -> bool {
    t.dim() >= 2 && !name.starts_with("embed.")
}

impl AdamW {
    /// `vars` in a fixed order (sorted by name) so updates and checkpoints are reproducible.
    pub fn new(vars: Vec<(String, Tensor)>, cfg: &OptimConfig) -> Self {
        let params = vars
            .into_iter()
            .map(|(name, tensor)| {
                let decay = decays(&name, &tensor);
                Param { exp_avg: tensor.zeros_like(), exp_avg_sq: tensor.zeros_like(), name, tensor, step: 0, decay }
            })
            .collect();
        AdamW { params, cfg: cfg.clone() }
    }

    /// Gradients of every parameter that received one.
    pub fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.tensor.grad()).filter(Tensor::defined).collect()
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// Global L2 norm of all gradients (one value read back to the host).
    pub fn grad_norm(&self) -> f64 {
        let norms: Vec<Tensor> =
            self.grads().iter().map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float)).collect();
        if norms.is_empty() {
            return 0.0;
        }
        f64::try_from(Tensor::stack(&norms, 0).sum(Kind::Float).sqrt()).unwrap_or(f64::NAN)
    }

    /// Scales every gradient in place (gradient clipping).
    pub fn scale_grads(&mut self, factor: f64) {
        tch::no_grad(|| {
            for mut g in self.grads() {
                g *= factor;
            }
        });
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
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
                p.exp_avg_sq *= b2;
                p.exp_avg_sq += g.square() * (1.0 - b2);
                let bc1 = 1.0 - b1.powi(p.step as i32);
                let bc2 = 1.0 - b2.powi(p.step as i32);
                let denom = p.exp_avg_sq.sqrt() / bc2.sqrt() + eps;
                p.tensor -= (&p.exp_avg / denom) * (lr / bc1);
            }
        });
    }

    /// Moments as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) and step counts.
    pub fn state(&self) -> (Vec<(String, Tensor)>, BTreeMap<String, i64>) {
        let mut tensors = Vec::with_capacity(self.params.len() * 2);
        let mut steps = BTreeMap::new();
        for p in &self.params {
            tensors.push((format!("{}.exp_avg", p.name), p.exp_avg.shallow_clone()));
            tensors.push((format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.shallow_clone()));
            steps.insert(p.name.clone(), p.step);
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
                for (suffix, dst) in [("exp_avg", &mut p.exp_avg), ("exp_avg_sq", &mut p.exp_avg_sq)] {
                    let key = format!("{}.{suffix}", p.name);
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
                p.step = *steps.get(&p.name).ok_or_else(|| missing(format!("optimizer steps lack {}", p.name)))?;
            }
            Ok(())
        })
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
        let got: Vec<f64> = Vec::try_from(w.detach().view([2])).expect("values");
        for i in 0..2 {
            assert!((got[i] - x[i]).abs() < 1e-12, "{got:?} vs {x:?}");
        }
        assert!(!decays("embed.weight", &w));
        assert!(!decays("layers.0.attn_norm.text.weight", &Tensor::zeros([4], (Kind::Float, tch::Device::Cpu))));
        assert!(decays("layers.0.attn.q_proj.text.weight", &w));
    }
}
