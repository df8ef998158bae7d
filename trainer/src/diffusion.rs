//! Gaussian diffusion for the Transfusion setting: the cosine noise schedule, forward noising,
//! DDPM and DDIM reverse steps for an epsilon-predicting model, per-image noise draws for
//! training, and image generation by iterative denoising.
//!
//! Timesteps are 0-based here: index `t` in `0..T` is step `t + 1` of Ho et al. (2020), so
//! `alpha_bar[0]` is the first (least noisy) step and `alpha_bar[T - 1]` the last.

use half::f16;
use motley_shards::{Batch, Latents, Modality, Segment, SegmentMeta, Vocab};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::error::TrainError;
use crate::model::{Model, Prepared, Routing};

/// Diffusion loss is reported per timestep bucket: `t * BUCKETS / T` (quarters of the schedule).
pub const BUCKETS: usize = 4;

/// Nichol & Dhariwal (2021) offset `s` of the cosine schedule.
const COSINE_S: f64 = 0.008;

/// The noise schedule: `betas[t]` and `alpha_bar[t] = prod_{s <= t} (1 - betas[s])`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub betas: Vec<f64>,
    pub alpha_bar: Vec<f64>,
}

impl Schedule {
    /// The cosine schedule with `steps` training timesteps: `f(u) = cos²((u/T + s)/(1 + s) · π/2)`,
    /// `beta_t = min(1 - f(t+1)/f(t), 0.999)` (the clip keeps the last steps finite).
    pub fn cosine(steps: usize) -> Self {
        let n = steps.max(1);
        let f = |u: f64| ((u / n as f64 + COSINE_S) / (1.0 + COSINE_S) * std::f64::consts::FRAC_PI_2).cos().powi(2);
        let betas: Vec<f64> = (0..n).map(|t| (1.0 - f(t as f64 + 1.0) / f(t as f64)).min(0.999)).collect();
        let mut alpha_bar = Vec::with_capacity(n);
        let mut prod = 1.0;
        for b in &betas {
            prod *= 1.0 - b;
            alpha_bar.push(prod);
        }
        Schedule { betas, alpha_bar }
    }

    /// Number of training timesteps T.
    pub fn steps(&self) -> usize {
        self.alpha_bar.len()
    }

    /// `alpha_bar` at `t`, or 1 (no noise) for `None`, the step before the first.
    pub fn alpha_bar_at(&self, t: Option<usize>) -> f64 {
        t.map_or(1.0, |t| self.alpha_bar[t.min(self.steps() - 1)])
    }

    /// Timestep bucket of `t` for metrics.
    pub fn bucket(&self, t: usize) -> usize {
        (t * BUCKETS / self.steps()).min(BUCKETS - 1)
    }

    /// `n` timesteps for sampling, evenly spaced over `0..T` and descending, always ending at 0
    /// and starting at `T - 1` (for `n >= T` every timestep).
    pub fn sampling_timesteps(&self, n: usize) -> Vec<usize> {
        let big_t = self.steps();
        let n = n.clamp(1, big_t);
        if n == 1 {
            return vec![big_t - 1];
        }
        let mut ts: Vec<usize> =
            (0..n).map(|i| ((i as f64) * (big_t - 1) as f64 / (n - 1) as f64).round() as usize).collect();
        ts.dedup();
        ts.reverse();
        ts
    }
}

/// `q(x_t | x_0)`: `sqrt(ab) x0 + sqrt(1 - ab) eps` (`ab` broadcasts: a scalar tensor or `[P, 1]`).
pub fn q_sample(x0: &Tensor, eps: &Tensor, alpha_bar: &Tensor) -> Tensor {
    x0 * alpha_bar.sqrt() + eps * (-alpha_bar + 1.0).sqrt()
}

/// The clean sample implied by a noise prediction: `(x_t - sqrt(1 - ab) eps) / sqrt(ab)`,
/// optionally clamped to `[-clip, clip]` (at the noisiest steps `1 / sqrt(ab)` is in the
/// thousands, so a small noise error makes a huge x_0; clamping is the usual sampling guard).
pub fn predict_x0(xt: &Tensor, eps: &Tensor, alpha_bar: f64, clip: Option<f64>) -> Tensor {
    let x0 = (xt - eps * (1.0 - alpha_bar).sqrt()) / alpha_bar.sqrt();
    match clip {
        Some(c) => x0.clamp(-c, c),
        None => x0,
    }
}

/// Coefficients of the Gaussian posterior `q(x_prev | x_t, x_0)` between two timesteps of
/// the (possibly respaced) chain with cumulative products `ab_t` and `ab_prev`:
/// `mean = c0 x0 + ct x_t`, variance `var`. With `alpha = ab_t / ab_prev`, `beta = 1 - alpha`:
/// `c0 = sqrt(ab_prev) beta / (1 - ab_t)`, `ct = sqrt(alpha) (1 - ab_prev) / (1 - ab_t)`,
/// `var = beta (1 - ab_prev) / (1 - ab_t)` (Ho et al. 2020, eq. 7).
pub fn posterior(ab_t: f64, ab_prev: f64) -> (f64, f64, f64) {
    let alpha = ab_t / ab_prev;
    let beta = 1.0 - alpha;
    let c0 = ab_prev.sqrt() * beta / (1.0 - ab_t);
    let ct = alpha.sqrt() * (1.0 - ab_prev) / (1.0 - ab_t);
    let var = beta * (1.0 - ab_prev) / (1.0 - ab_t);
    (c0, ct, var)
}

/// One ancestral DDPM step from `t` to `prev` (None = to the clean sample; no noise is added then).
pub fn ddpm_step(
    sched: &Schedule,
    xt: &Tensor,
    eps: &Tensor,
    t: usize,
    prev: Option<usize>,
    z: &Tensor,
    clip: Option<f64>,
) -> Tensor {
    let (ab_t, ab_prev) = (sched.alpha_bar_at(Some(t)), sched.alpha_bar_at(prev));
    let x0 = predict_x0(xt, eps, ab_t, clip);
    let (c0, ct, var) = posterior(ab_t, ab_prev);
    let mean = x0 * c0 + xt * ct;
    if prev.is_none() { mean } else { mean + z * var.sqrt() }
}

/// One DDIM step (Song et al. 2021, eq. 12) from `t` to `prev`; `eta = 0` is deterministic,
/// `eta = 1` has the DDPM posterior variance.
#[allow(clippy::too_many_arguments)] // the equation's inputs, each a different kind of value
pub fn ddim_step(
    sched: &Schedule,
    xt: &Tensor,
    eps: &Tensor,
    t: usize,
    prev: Option<usize>,
    eta: f64,
    z: &Tensor,
    clip: Option<f64>,
) -> Tensor {
    let (ab_t, ab_prev) = (sched.alpha_bar_at(Some(t)), sched.alpha_bar_at(prev));
    let x0 = predict_x0(xt, eps, ab_t, clip);
    // With a clamped x_0 the noise direction is re-derived from it, so the step stays consistent.
    let eps = match clip {
        Some(_) => (xt - &x0 * ab_t.sqrt()) / (1.0 - ab_t).sqrt(),
        None => eps.shallow_clone(),
    };
    let sigma = eta * ((1.0 - ab_prev) / (1.0 - ab_t)).sqrt() * (1.0 - ab_t / ab_prev).sqrt();
    let dir = (1.0 - ab_prev - sigma * sigma).max(0.0).sqrt();
    let out = x0 * ab_prev.sqrt() + &eps * dir;
    if sigma > 0.0 { out + z * sigma } else { out }
}

/// `n` standard normal draws (Box–Muller on a seeded ChaCha stream: the same on every machine).
pub fn normal_draws(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // u1 in (0, 1] so the log is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// A reproducible stream for `(seed, step, stream)`: training noise depends on nothing else,
/// so a resumed run draws exactly what the uninterrupted one did.
pub fn noise_rng(seed: u64, step: u64, stream: u64) -> ChaCha8Rng {
    let mix =
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ stream.rotate_left(32);
    ChaCha8Rng::seed_from_u64(mix ^ 0xD1FF_0510_0000_0001)
}

/// How training draws timesteps (the Transfusion recipe).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoisePolicy {
    /// Fraction of images followed by text (in their document) whose timestep is capped.
    pub caption_fraction: f64,
    /// The cap: those images get `t < caption_max_t` (Transfusion: t ≤ 500 of 1,000).
    pub caption_max_t: usize,
}

/// Which reverse process [`generate_image`] runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// Ancestral sampling with the posterior variance.
    Ddpm,
    /// DDIM with noise scale `eta` (0 = deterministic).
    Ddim { eta: f64 },
}

/// Options of [`generate_image`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    /// Number of denoising steps (at most T; evenly spaced over the schedule).
    pub steps: usize,
    pub sampler: Sampler,
    pub seed: u64,
    /// Clamp the predicted x_0 to `[-clip, clip]` (in the model's scaled latent units, where
    /// the training data has RMS 1) at every step; None = no clamp.
    pub clip_x0: Option<f64>,
}

/// Generates one image of `n_patches` latent patches after `prompt` (global ids, e.g.
/// `bos` and a caption; a `boi` is appended unless the prompt ends with one). Each step runs
/// the full forward pass over prompt + noisy patches (no KV cache) and takes one DDPM or DDIM
/// step; returns the `[n_patches, latent_dim]` fp32 latents in the corpus's units (divided by
/// the model's `latent_scale`), ready for the latent tokenizer.
pub fn generate_image(
    model: &Model,
    vocab: &Vocab,
    prompt: &[u32],
    n_patches: usize,
    opts: &GenerateOptions,
    device: Device,
) -> Result<Tensor, TrainError> {
    // Expert-choice MoE would route the prompt and patches among themselves, not as trained.
    model.check_decodable()?;
    let dim = model.cfg.latent_dim;
    if dim <= 0 {
        return Err(TrainError::Config { path: "model.latent_dim".into(), msg: "the model has no latent head".into() });
    }
    let (boi, placeholder) = match (vocab.special("boi"), vocab.modality(Modality::Image)) {
        (Some(b), Some(m)) => (b, m.offset),
        _ => return Err(TrainError::Batch("the vocabulary has no boi special or image block".into())),
    };
    if n_patches == 0 {
        return Err(TrainError::Batch("n_patches must be > 0".into()));
    }
    // A NaN or negative eta / clip would not fail: it would quietly change the sampler.
    let bad = |path: &str, msg: String| Err(TrainError::Config { path: path.into(), msg });
    if let Sampler::Ddim { eta } = opts.sampler
        && !(eta.is_finite() && eta >= 0.0)
    {
        return bad("eta", format!("must be a finite number >= 0 (got {eta})"));
    }
    if let Some(c) = opts.clip_x0
        && !(c > 0.0)
    {
        return bad("clip_x0", format!("must be > 0 (got {c})"));
    }
    let mut ids: Vec<u32> = prompt.to_vec();
    if ids.last() != Some(&boi) {
        ids.push(boi);
    }
    let first_patch = ids.len();
    let len = first_patch + n_patches;
    let mut batch = Batch { batch_size: 1, seq_len: len, ..Batch::default() };
    for (i, &id) in ids.iter().enumerate() {
        batch.inputs.push(id);
        batch.modality.push(vocab.modality_of(id) as u8);
        batch.segment_ids.push(i as u32);
    }
    let image_segment = first_patch as u32;
    batch.inputs.extend(std::iter::repeat_n(placeholder, n_patches));
    batch.modality.extend(std::iter::repeat_n(Modality::Image as u8, n_patches));
    batch.segment_ids.extend(std::iter::repeat_n(image_segment, n_patches));
    // Targets do not matter for sampling; the next input (placeholder at the end) keeps ids valid.
    batch.targets = batch.inputs[1..].iter().copied().chain(std::iter::once(placeholder)).collect();
    batch.target_modality = batch.modality.clone();
    batch.positions = (0..len as u32).collect();
    batch.doc_ids = vec![0; len];
    batch.loss_mask = vec![0; len];
    batch.latents = Latents {
        dim: dim as usize,
        data: vec![f16::ZERO; n_patches * dim as usize],
        positions: (first_patch as u32..len as u32).collect(),
    };
    let mut p = Prepared::new(&model.cfg, &batch, Routing::Sorted, device)?;
    let sched = Schedule::cosine(model.cfg.diffusion_steps as usize);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let shape = [n_patches as i64, dim];
    let draw = |rng: &mut ChaCha8Rng| {
        Tensor::from_slice(&normal_draws(rng, n_patches * dim as usize)).view(shape).to_device(device)
    };
    let mut x = draw(&mut rng);
    let ts = sched.sampling_timesteps(opts.steps);
    for (k, &t) in ts.iter().enumerate() {
        let prev = ts.get(k + 1).copied();
        let lat = p.latent.as_mut().ok_or_else(|| TrainError::Batch("lost the latent layout".into()))?;
        lat.set_noised(x.shallow_clone(), vec![t], None);
        let eps = tch::no_grad(|| model.predict_noise(&p));
        let z = draw(&mut rng);
        x = match opts.sampler {
            Sampler::Ddpm => ddpm_step(&sched, &x, &eps, t, prev, &z, opts.clip_x0),
            Sampler::Ddim { eta } => ddim_step(&sched, &x, &eps, t, prev, eta, &z, opts.clip_x0),
        };
    }
    Ok(x / model.cfg.latent_factor())
}

/// Wraps generated latents `[grid.0 * grid.1, dim]` as an image segment, ready for the latent
/// image tokenizer's `decode_to_png` (the trainer does not link the tokenizers).
pub fn latents_to_segment(latents: &Tensor, grid: (u16, u16)) -> Result<Segment, TrainError> {
    let size = latents.size();
    if size.len() != 2 || size[0] != i64::from(grid.0) * i64::from(grid.1) {
        return Err(TrainError::Batch(format!("latents of shape {size:?} do not fill a {}x{} grid", grid.0, grid.1)));
    }
    let flat = latents.to_kind(Kind::Float).to_device(Device::Cpu).reshape([-1]);
    let values: Vec<f32> = Vec::<f32>::try_from(&flat).map_err(TrainError::torch("read latents"))?;
    let data: Vec<f16> = values.into_iter().map(f16::from_f32).collect();
    let meta = SegmentMeta { grid: Some(grid), ..SegmentMeta::default() };
    Ok(Segment::latent(Modality::Image, size[1] as u32, data).with_meta(meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn cosine_schedule_matches_the_closed_form() {
        let s = Schedule::cosine(1000);
        assert_eq!(s.steps(), 1000);
        // Before the clip matters, alpha_bar[t] = f(t+1)/f(0) with f(u) = cos²((u/1000 + 0.008)/1.008 · π/2).
        let f = |u: f64| ((u / 1000.0 + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
        for t in [0usize, 1, 249, 499, 749, 900] {
            assert!(close(s.alpha_bar[t], f(t as f64 + 1.0) / f(0.0), 1e-12), "t={t}");
        }
        // Worked out separately (python: f = lambda u: math.cos((u/1000+0.008)/1.008*math.pi/2)**2):
        // f(0) = 0.99984459, f(1)/f(0) = 0.99995872, f(250)/f(0) = 0.84701216, f(500)/f(0) = 0.49384359.
        assert!(close(s.alpha_bar[0], 0.999_958_716, 1e-9), "{}", s.alpha_bar[0]);
        assert!(close(s.alpha_bar[249], 0.847_012_161, 1e-9), "{}", s.alpha_bar[249]);
        assert!(close(s.alpha_bar[499], 0.493_843_590, 1e-9), "{}", s.alpha_bar[499]);
        // The last beta is clipped at 0.999 (f(T) ≈ 0 makes the raw beta 1), so alpha_bar stays > 0.
        assert!(close(s.betas[999], 0.999, 1e-12));
        assert!(s.alpha_bar[999] > 0.0 && s.alpha_bar[999] < 1e-6);
        assert!(s.betas.iter().all(|&b| b > 0.0 && b <= 0.999));
        assert!(s.alpha_bar.windows(2).all(|w| w[1] < w[0]));
        assert_eq!((s.bucket(0), s.bucket(249), s.bucket(250), s.bucket(999)), (0, 0, 1, 3));
    }

    #[test]
    fn sampling_timesteps_span_the_schedule() {
        let s = Schedule::cosine(1000);
        assert_eq!(s.sampling_timesteps(1), vec![999]);
        assert_eq!(s.sampling_timesteps(4), vec![999, 666, 333, 0]);
        assert_eq!(s.sampling_timesteps(5000).len(), 1000);
    }

    #[test]
    fn posterior_on_a_hand_case() {
        // ab_t = 0.5, ab_prev = 0.8: alpha = 0.625, beta = 0.375;
        // c0 = sqrt(0.8)·0.375/0.5 = 0.670820..., ct = sqrt(0.625)·0.2/0.5 = 0.316227...,
        // var = 0.375·0.2/0.5 = 0.15.
        let (c0, ct, var) = posterior(0.5, 0.8);
        assert!(close(c0, 0.8f64.sqrt() * 0.75, 1e-12));
        assert!(close(c0, 0.670_820_393, 1e-9));
        assert!(close(ct, 0.316_227_766, 1e-9));
        assert!(close(var, 0.15, 1e-12));
        // DDPM one step from t=1 to t=0 on scalars: x_t = 1, eps = 0.5 on the real schedule.
        let s = Schedule::cosine(1000);
        let (ab1, ab0) = (s.alpha_bar[1], s.alpha_bar[0]);
        let x0 = (1.0 - (1.0 - ab1).sqrt() * 0.5) / ab1.sqrt();
        let (c0, ct, var) = posterior(ab1, ab0);
        let xt = Tensor::from_slice(&[1.0f64]);
        let eps = Tensor::from_slice(&[0.5f64]);
        let z = Tensor::from_slice(&[2.0f64]);
        let got = f64::try_from(ddpm_step(&s, &xt, &eps, 1, Some(0), &z, None).get(0)).expect("scalar");
        assert!(close(got, c0 * x0 + ct * 1.0 + var.sqrt() * 2.0, 1e-12));
        // The posterior at the chain's real step equals betas: var = beta_t (1 - ab_{t-1}) / (1 - ab_t).
        assert!(close(var, s.betas[1] * (1.0 - ab0) / (1.0 - ab1), 1e-12));
    }

    #[test]
    fn forward_then_ddim_with_the_true_noise_recovers_x0() {
        tch::set_num_threads(1);
        let s = Schedule::cosine(1000);
        let x0 = Tensor::from_slice(&[0.3f64, -1.2, 2.0, 0.0, 0.7, -0.4]).view([3, 2]);
        let eps = Tensor::from_slice(&[1.0f64, -0.5, 0.25, 2.0, -1.5, 0.1]).view([3, 2]);
        let z = Tensor::zeros([3, 2], (Kind::Double, Device::Cpu));
        for t in [0usize, 10, 500, 990] {
            let ab = Tensor::from_slice(&[s.alpha_bar[t]]);
            let xt = q_sample(&x0, &eps, &ab);
            // Jump straight to the clean sample with the true noise.
            let back = ddim_step(&s, &xt, &eps, t, None, 0.0, &z, None);
            assert!(back.allclose(&x0, 1e-9, 1e-9, false), "t={t}");
            // One DDIM step to a lower t lands exactly on q_sample at that t with the same noise.
            if t >= 10 {
                let mid = ddim_step(&s, &xt, &eps, t, Some(t - 10), 0.0, &z, None);
                // A clamp wider than the data changes nothing.
                let clamped = ddim_step(&s, &xt, &eps, t, Some(t - 10), 0.0, &z, Some(10.0));
                assert!(mid.allclose(&clamped, 1e-9, 1e-9, false), "t={t}");
                let want = q_sample(&x0, &eps, &Tensor::from_slice(&[s.alpha_bar[t - 10]]));
                assert!(mid.allclose(&want, 1e-9, 1e-9, false), "t={t}");
            }
        }
        // eta = 1 DDIM has the DDPM posterior mean and variance.
        let xt = q_sample(&x0, &eps, &Tensor::from_slice(&[s.alpha_bar[300]]));
        let zz = Tensor::ones([3, 2], (Kind::Double, Device::Cpu));
        let a = ddim_step(&s, &xt, &eps, 300, Some(200), 1.0, &zz, None);
        let b = ddpm_step(&s, &xt, &eps, 300, Some(200), &zz, None);
        assert!(a.allclose(&b, 1e-9, 1e-9, false));
    }

    #[test]
    fn normal_draws_are_standard_and_reproducible() {
        let a = normal_draws(&mut noise_rng(1, 2, 0), 20_000);
        let b = normal_draws(&mut noise_rng(1, 2, 0), 20_000);
        assert_eq!(a, b);
        assert_ne!(a, normal_draws(&mut noise_rng(1, 3, 0), 20_000));
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }

    #[test]
    fn generate_image_returns_latents_of_the_right_shape() {
        tch::set_num_threads(1);
        let vocab = Vocab::build(32, 0, 24, Some(6));
        let cfg = crate::model::ModelConfig {
            vocab_size: i64::from(vocab.total_size),
            latent_dim: 6,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            ffn_multiple_of: 16,
            ..crate::model::ModelConfig::default()
        };
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let model = Model::new_seeded(&vs.root(), &cfg, 9).expect("model");
        let prompt = [vocab.special("bos").expect("bos"), 3, 4, 5];
        let mut outs = Vec::new();
        for sampler in [Sampler::Ddpm, Sampler::Ddim { eta: 0.0 }] {
            let opts = GenerateOptions { steps: 5, sampler, seed: 1, clip_x0: Some(3.0) };
            let x = generate_image(&model, &vocab, &prompt, 16, &opts, Device::Cpu).expect("generate");
            assert_eq!(x.size(), vec![16, 6]);
            assert!(f64::try_from(x.isfinite().all().to_kind(Kind::Double)).expect("scalar") == 1.0);
            // Same seed, same image.
            let again = generate_image(&model, &vocab, &prompt, 16, &opts, Device::Cpu).expect("generate");
            assert!(x.equal(&again));
            outs.push(x);
        }
        assert!(!outs[0].equal(&outs[1]), "DDPM and DDIM take different paths");
        for (sampler, clip_x0) in
            [(Sampler::Ddim { eta: f64::NAN }, None), (Sampler::Ddim { eta: -1.0 }, None), (Sampler::Ddpm, Some(-2.0))]
        {
            let opts = GenerateOptions { steps: 2, sampler, seed: 1, clip_x0 };
            let err = generate_image(&model, &vocab, &prompt, 4, &opts, Device::Cpu);
            assert!(matches!(err, Err(TrainError::Config { .. })), "{sampler:?} {clip_x0:?}: {err:?}");
        }
        let seg = latents_to_segment(&outs[0], (4, 4)).expect("segment");
        assert_eq!((seg.meta.grid, seg.modality), (Some((4, 4)), Modality::Image));
        assert!(latents_to_segment(&outs[0], (3, 3)).is_err());
        let no_head = crate::model::ModelConfig { latent_dim: 0, ..cfg };
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let plain = Model::new_seeded(&vs.root(), &no_head, 9).expect("model");
        let opts = GenerateOptions { steps: 2, sampler: Sampler::Ddpm, seed: 1, clip_x0: None };
        assert!(generate_image(&plain, &vocab, &prompt, 4, &opts, Device::Cpu).is_err());
    }
}
