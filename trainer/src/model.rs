//! The decoder-only transformer, read top to bottom: Config → Route → Attention → FFN → Block → Model.
//!
//! One code path serves three architectures:
//! - `dense`: the baseline; every token goes through the same weights.
//! - `mot`: Mixture-of-Transformers; Q/K/V/O, FFN, attention norm and FFN norm are untied
//!   per modality ("towers"), attention stays one global softmax over the whole sequence.
//!   `untie_head` also unties the final norm and the LM head.
//! - `moe`: the paper's MoE-4x baseline; the FFN is 4 experts of the dense FFN's size with
//!   expert-choice routing (token-choice top-k as an option).
//!
//! Modality routing (MoT): per batch, tokens are sorted by modality once (stable, integer
//! indices computed on the host from the `Batch`), so each tower runs its matmuls on one
//! contiguous slice; order is restored only around attention. The loss is computed in sorted
//! order against targets permuted the same way. `Routing::GatherScatter` is the plain
//! Algorithm-1 form (gather each modality's rows, scatter results back, per op), kept as the
//! test oracle.
//!
//! Storage: each projection or norm site keeps every tower's weights in one leaf tensor
//! ([`Stacked`], `[towers, Σ out, in]`); checkpoints see them per tower under self-describing
//! names through [`public_views`].
//!
//! Precision: weights are fp32 masters; `compute_kind` (bf16 on CUDA) is applied by hand at
//! every matmul and attention call, norms and the loss run in fp32. tch's `autocast` only
//! offers CUDA fp16, which would need loss scaling.

use motley_shards::{Batch, Modality};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::error::TrainError;

// ---------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------

/// Which architecture the config builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Dense,
    Mot,
    Moe,
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dense" => Ok(Arch::Dense),
            "mot" => Ok(Arch::Mot),
            "moe" => Ok(Arch::Moe),
            other => Err(format!("unknown arch `{other}` (expected dense, mot or moe)")),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Dense => "dense",
            Arch::Mot => "mot",
            Arch::Moe => "moe",
        })
    }
}

/// How MoE tokens meet experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoeRouting {
    /// Each expert picks its top-C tokens (static shapes, no host sync; the paper's baseline).
    ExpertChoice,
    /// Each token picks its top-k experts; needs per-expert counts on the host (one sync per layer).
    TokenChoice,
}

/// Where the per-block norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormPlacement {
    /// `h = x + Attn(Norm(x))` (llama).
    Pre,
    /// Chameleon's "swin" norm: `h = x + Norm(Attn(x))`.
    Swin,
}

/// Model shape and architecture. Every field has a default, so a TOML `[model]` table only
/// names what it changes; unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Global vocabulary size; 0 = `total_size` from the corpus manifest.
    pub vocab_size: i64,
    pub d_model: i64,
    pub n_layers: i64,
    pub n_heads: i64,
    /// SwiGLU hidden size; 0 = 2/3 * 4 * d_model rounded up to `ffn_multiple_of`.
    pub ffn_hidden: i64,
    pub ffn_multiple_of: i64,
    /// RMSNorm over head_dim on queries and keys (per modality under MoT).
    pub qk_norm: bool,
    pub norm: NormPlacement,
    pub norm_eps: f64,
    pub rope_theta: f64,
    /// MoT only: untie the final norm and the LM head per modality as well.
    pub untie_head: bool,
    /// MoT only: run each projection for all towers as one grouped GEMM (`torch._grouped_mm`
    /// over the sorted rows) instead of one matmul per tower. Needs the op on the device
    /// (CPU, for tests; CUDA sm_90/sm_100 in bf16: H100, H200, B200 — not A100, where torch
    /// falls back to a loop with a host sync); d_model and the FFN width must be multiples of 8.
    pub grouped_mm: bool,
    /// MoE only.
    pub n_experts: i64,
    pub moe_routing: MoeRouting,
    pub moe_top_k: i64,
    /// Expert-choice: tokens per expert = capacity_factor * N / n_experts.
    pub moe_capacity_factor: f64,
    /// Token-choice load-balancing loss weight (Switch Transformer form).
    pub moe_aux_loss_coef: f64,
    /// Std of the normal init for matrices and embeddings; output projections get
    /// `init_std / sqrt(2 * n_layers)`.
    pub init_std: f64,
    /// Transfusion setting: size of one latent image patch vector; 0 = the corpus manifest's
    /// image `latent_dim` (stays 0 without continuous images: then there is no latent head).
    pub latent_dim: i64,
    /// Latents are multiplied by this before diffusion so they have about unit scale (as the
    /// VAE scale factor of latent diffusion); 0 = `1 / RMS` of the corpus's latents, measured
    /// when training starts and written into the resolved config (1 when nothing is measured).
    pub latent_scale: f64,
    /// Weight λ of the diffusion loss in `L = L_LM + λ·L_DDPM` (Transfusion: 5).
    pub diffusion_lambda: f64,
    /// Training timesteps T of the cosine noise schedule.
    pub diffusion_steps: i64,
    /// Fraction of the images followed by text whose timestep is capped (captioning).
    pub caption_noise_fraction: f64,
    /// Those images get `t < caption_max_t` (Transfusion: t ≤ 500 of 1,000).
    pub caption_max_t: i64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            arch: Arch::Mot,
            vocab_size: 0,
            d_model: 256,
            n_layers: 4,
            n_heads: 8,
            ffn_hidden: 0,
            ffn_multiple_of: 256,
            qk_norm: true,
            norm: NormPlacement::Pre,
            norm_eps: 1e-5,
            rope_theta: 10_000.0,
            untie_head: false,
            grouped_mm: false,
            n_experts: 4,
            moe_routing: MoeRouting::ExpertChoice,
            moe_top_k: 1,
            moe_capacity_factor: 1.0,
            moe_aux_loss_coef: 0.01,
            init_std: 0.02,
            latent_dim: 0,
            latent_scale: 0.0,
            diffusion_lambda: 5.0,
            diffusion_steps: 1000,
            caption_noise_fraction: 0.2,
            caption_max_t: 500,
        }
    }
}

impl ModelConfig {
    /// The factor latents are multiplied by before diffusion (`latent_scale`, 1 while unset).
    pub fn latent_factor(&self) -> f64 {
        if self.latent_scale > 0.0 { self.latent_scale } else { 1.0 }
    }

    pub fn head_dim(&self) -> i64 {
        self.d_model / self.n_heads.max(1)
    }

    /// SwiGLU hidden width (the playbook's 2/3 * 4d rounded up).
    pub fn ffn_dim(&self) -> i64 {
        if self.ffn_hidden > 0 {
            return self.ffn_hidden;
        }
        let raw = (2 * 4 * self.d_model) / 3;
        let m = self.ffn_multiple_of.max(1);
        (raw + m - 1) / m * m
    }

    /// Number of towers the untied parts get (3 under MoT, else 1).
    pub fn towers(&self) -> usize {
        if self.arch == Arch::Mot { Modality::COUNT } else { 1 }
    }

    /// Checks shapes before any tensor is allocated.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |msg: String| Err(TrainError::Config { path: "model".into(), msg });
        if self.vocab_size <= 0 {
            return bad(format!("vocab_size must be > 0 (got {})", self.vocab_size));
        }
        if self.d_model <= 0 || self.n_layers <= 0 || self.n_heads <= 0 {
            return bad("d_model, n_layers and n_heads must be > 0".into());
        }
        if self.d_model % self.n_heads != 0 || self.head_dim() % 2 != 0 {
            return bad(format!("d_model {} must split into n_heads {} of even head_dim", self.d_model, self.n_heads));
        }
        if self.grouped_mm && (self.d_model % 8 != 0 || self.ffn_dim() % 8 != 0) {
            return bad(format!(
                "grouped_mm needs d_model ({}) and the FFN width ({}) to be multiples of 8",
                self.d_model,
                self.ffn_dim()
            ));
        }
        if self.arch == Arch::Moe {
            if self.n_experts < 1 || self.moe_top_k < 1 || self.moe_top_k > self.n_experts {
                return bad(format!("need 1 <= moe_top_k ({}) <= n_experts ({})", self.moe_top_k, self.n_experts));
            }
            if !(self.moe_capacity_factor > 0.0) {
                return bad("moe_capacity_factor must be > 0".into());
            }
        }
        if self.latent_dim < 0 || self.diffusion_steps < 1 || !(self.diffusion_lambda >= 0.0) {
            return bad("need latent_dim >= 0, diffusion_steps >= 1 and diffusion_lambda >= 0".into());
        }
        if !(self.latent_scale >= 0.0 && self.latent_scale.is_finite()) {
            return bad(format!("latent_scale must be >= 0 and finite (got {})", self.latent_scale));
        }
        if !(0.0..=1.0).contains(&self.caption_noise_fraction)
            || self.caption_max_t < 1
            || self.caption_max_t > self.diffusion_steps
        {
            return bad("need caption_noise_fraction in [0, 1] and 1 <= caption_max_t <= diffusion_steps".into());
        }
        Ok(())
    }

    /// Matmul FLOPs per token for one forward+backward pass (6 per active weight, plus
    /// 12 * L * d * T for attention scores and values, PaLM appendix B). Embedding lookups
    /// are free; the LM head counts. Equal for dense and MoT, as the paper notes.
    pub fn flops_per_token(&self, seq_len: i64) -> f64 {
        let d = self.d_model as f64;
        let f = self.ffn_dim() as f64;
        let l = self.n_layers as f64;
        let v = self.vocab_size as f64;
        let attn_proj = 4.0 * d * d;
        let ffn = match self.arch {
            Arch::Moe => {
                let per_token_experts = match self.moe_routing {
                    MoeRouting::ExpertChoice => self.moe_capacity_factor,
                    MoeRouting::TokenChoice => self.moe_top_k as f64,
                };
                3.0 * d * f * per_token_experts + d * self.n_experts as f64
            }
            _ => 3.0 * d * f,
        };
        let active = l * (attn_proj + ffn) + d * v;
        6.0 * active + 12.0 * l * d * seq_len as f64
    }

    /// Total parameter count (all towers / experts; embedding included).
    pub fn param_count(&self) -> i64 {
        let d = self.d_model;
        let f = self.ffn_dim();
        let t = self.towers() as i64;
        let hd = self.head_dim();
        let qk = if self.qk_norm { 2 * hd } else { 0 };
        let attn = t * (4 * d * d + qk);
        let ffn = match self.arch {
            Arch::Moe => self.n_experts * 3 * d * f + self.n_experts * d,
            _ => t * 3 * d * f,
        };
        let norms = t * 2 * d;
        let head_towers = if self.untie_head { t } else { 1 };
        // Latent head: latent_in, latent_out and the two-layer timestep MLP.
        let latent = if self.latent_dim > 0 { 2 * d * self.latent_dim + 2 * d * d } else { 0 };
        self.n_layers * (attn + ffn + norms) + self.vocab_size * d + head_towers * (d + d * self.vocab_size) + latent
    }
}

// ---------------------------------------------------------------------------------------
// Route: the per-batch token layout
// ---------------------------------------------------------------------------------------

/// How per-modality weights meet tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Sort tokens by modality once per batch; each tower works on one contiguous slice.
    Sorted,
    /// Gather each modality's rows and scatter results back at every op (the oracle).
    GatherScatter,
}

/// The layout of one batch's `N = batch * seq` tokens inside the layers. Built on the host,
/// once per batch; layers never look at token values, so no device → host sync happens there.
#[derive(Debug)]
pub struct Route {
    n: i64,
    kind: RouteKind,
}

#[derive(Debug)]
enum RouteKind {
    /// One tower sees all tokens in sequence order (dense, MoE).
    Single,
    /// Layout order = tokens stably sorted by modality. `perm[i]` is the sequence index of
    /// layout row i; `inv` maps back. `spans[m] = (start, len)` of modality m's rows.
    /// `ends`: int32 end row of every tower, when matmuls run as one grouped GEMM.
    Sorted { perm: Tensor, inv: Tensor, spans: [(i64, i64); Modality::COUNT], ends: Option<Tensor> },
    /// Layout order = sequence order; `idx[m]` lists modality m's rows (None if absent).
    Scatter { idx: Vec<Option<Tensor>> },
}

impl Route {
    /// `n` tokens all in one tower, in sequence order.
    fn single(n: i64) -> Route {
        Route { n, kind: RouteKind::Single }
    }

    /// Number of tokens.
    pub fn len(&self) -> i64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Towers that have tokens in this batch, in modality order.
    fn active(&self) -> Vec<usize> {
        match &self.kind {
            RouteKind::Single => vec![0],
            RouteKind::Sorted { spans, .. } => (0..Modality::COUNT).filter(|&m| spans[m].1 > 0).collect(),
            RouteKind::Scatter { idx } => (0..idx.len()).filter(|&m| idx[m].is_some()).collect(),
        }
    }

    /// Rows tower `m` holds.
    fn rows(&self, m: usize) -> i64 {
        match &self.kind {
            RouteKind::Single => self.n,
            RouteKind::Sorted { spans, .. } => spans[m].1,
            RouteKind::Scatter { idx } => idx[m].as_ref().map_or(0, |i| i.size()[0]),
        }
    }

    /// `x` (layout order) cut into each active tower's rows, in `active()` order. Sorted: one
    /// `split_with_sizes`, whose backward is a single cat (slicing per tower would zero-fill a
    /// full-size gradient for every tower). Oracle: a gather per tower.
    fn split(&self, x: &Tensor) -> Vec<(usize, Tensor)> {
        let active = self.active();
        match &self.kind {
            RouteKind::Single => vec![(0, x.shallow_clone())],
            RouteKind::Sorted { .. } if active.len() == 1 => vec![(active[0], x.shallow_clone())],
            RouteKind::Sorted { spans, .. } => {
                let sizes: Vec<i64> = active.iter().map(|&m| spans[m].1).collect();
                active.into_iter().zip(x.split_with_sizes(sizes.as_slice(), 0)).collect()
            }
            RouteKind::Scatter { idx } => {
                active.into_iter().filter_map(|m| idx[m].as_ref().map(|i| (m, x.index_select(0, i)))).collect()
            }
        }
    }

    /// Puts per-tower results (in `active()` order) back into one layout-order tensor.
    fn combine(&self, parts: Vec<(usize, Tensor)>) -> Tensor {
        match &self.kind {
            RouteKind::Single | RouteKind::Sorted { .. } if parts.len() == 1 => {
                parts.into_iter().next().map(|(_, t)| t).unwrap_or_default()
            }
            RouteKind::Single | RouteKind::Sorted { .. } => {
                let ts: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
                Tensor::cat(&ts, 0)
            }
            RouteKind::Scatter { idx } => {
                let mut out: Option<Tensor> = None;
                for (m, part) in parts {
                    let Some(i) = &idx[m] else { continue };
                    let mut shape = part.size();
                    shape[0] = self.n;
                    let base =
                        out.take().unwrap_or_else(|| Tensor::zeros(shape.as_slice(), (part.kind(), part.device())));
                    out = Some(base.index_copy(0, i, &part));
                }
                out.unwrap_or_default()
            }
        }
    }

    /// Applies `f(tower, rows)` to every active tower's rows and recombines in layout order.
    pub fn map(&self, x: &Tensor, f: impl Fn(usize, &Tensor) -> Tensor) -> Tensor {
        let parts = self.split(x).into_iter().map(|(m, xs)| (m, f(m, &xs))).collect();
        self.combine(parts)
    }

    /// `x @ w[m]ᵀ` on each tower's rows; `w`: `[towers, out, in]`. Only the matmuls are per
    /// tower: everything elementwise around them runs once over all rows.
    fn matmul(&self, x: &Tensor, w: &Tensor) -> Tensor {
        if w.size()[0] == 1 {
            return x.linear::<Tensor>(&w.squeeze_dim(0), None);
        }
        match &self.kind {
            RouteKind::Sorted { ends: Some(ends), .. } => {
                // Model::new checked the op runs on this device and kind.
                return x.internal_grouped_mm(&w.transpose(1, 2), Some(ends), None::<&Tensor>, None);
            }
            RouteKind::Sorted { spans, ends: None, .. } => {
                // One autograd node, nothing but the per-tower matmuls in either direction.
                let sizes = spans.map(|(_, len)| len);
                match crate::ops::tower_linear(x, w, &sizes) {
                    Ok(y) => return y,
                    Err(e) => {
                        static WARNED: std::sync::Once = std::sync::Once::new();
                        WARNED.call_once(|| tracing::warn!("tower_linear failed, using split + cat: {e}"));
                    }
                }
            }
            _ => {}
        }
        // unbind, not select: its backward stacks the towers' gradients in one op.
        let ws = w.unbind(0);
        self.map(x, |m, xs| xs.linear::<Tensor>(&ws[m], None))
    }

    /// Per-tower values `w` (`[towers, ...]`) repeated on each tower's rows: `[N, ...]` in layout
    /// order, or `w` itself (broadcasts) with one tower. For per-tower norm weights applied
    /// after one weightless norm over all rows.
    fn per_row(&self, w: &Tensor) -> Tensor {
        if w.size()[0] == 1 {
            return w.shallow_clone();
        }
        let ws = w.unbind(0);
        let parts = self
            .active()
            .into_iter()
            .map(|m| {
                let mut shape = ws[m].size();
                shape.insert(0, self.rows(m));
                (m, ws[m].unsqueeze(0).expand(shape.as_slice(), false))
            })
            .collect();
        self.combine(parts)
    }

    /// Layout order → sequence order (before attention, and for inspecting outputs). Written
    /// as a scatter (`y[perm[r]] = x[r]`) into uninitialized memory rather than a gather: the
    /// backward is then a plain gather, where a gather's backward is a zero fill plus an
    /// (on CUDA atomic) index_add.
    pub fn to_seq(&self, x: &Tensor) -> Tensor {
        match &self.kind {
            RouteKind::Sorted { perm, .. } => scatter_rows(x, perm),
            _ => x.shallow_clone(),
        }
    }

    /// Sequence order → layout order (after attention), the same way (`y[inv[i]] = x[i]`).
    pub fn from_seq(&self, x: &Tensor) -> Tensor {
        match &self.kind {
            RouteKind::Sorted { inv, .. } => scatter_rows(x, inv),
            _ => x.shallow_clone(),
        }
    }
}

/// `y[index[r]] = x[r]` for a permutation `index`: every row of `y` is written, so it starts
/// uninitialized, and the scatter is in place (out-of-place `index_copy` would first copy the
/// uninitialized tensor). Autograd records it on `y`; the backward is `grad.index_select(0, index)`.
fn scatter_rows(x: &Tensor, index: &Tensor) -> Tensor {
    let mut y = x.empty_like();
    let _ = y.index_copy_(0, index, x);
    y
}

impl Route {
    /// Stable counting sort of the tokens by `modality` (host side): the sorted route, its
    /// permutation (`perm[row]` = sequence index of layout row) and inverse (`inv[i]` = layout row).
    fn sorted(modality: &[u8], device: Device, grouped: bool) -> (Route, Vec<usize>, Vec<i64>) {
        let n = modality.len();
        let mut perm = Vec::with_capacity(n);
        let mut spans = [(0i64, 0i64); Modality::COUNT];
        for (m, span) in spans.iter_mut().enumerate() {
            let before = perm.len();
            perm.extend((0..n).filter(|&i| usize::from(modality[i]) == m));
            *span = (before as i64, (perm.len() - before) as i64);
        }
        let mut inv = vec![0i64; n];
        for (row, &i) in perm.iter().enumerate() {
            inv[i] = row as i64;
        }
        let perm_i64: Vec<i64> = perm.iter().map(|&i| i as i64).collect();
        let ends: Vec<i32> = spans.iter().map(|&(start, len)| (start + len) as i32).collect();
        let kind = RouteKind::Sorted {
            perm: Tensor::from_slice(&perm_i64).to_device(device),
            inv: Tensor::from_slice(&inv).to_device(device),
            spans,
            ends: grouped.then(|| Tensor::from_slice(&ends).to_device(device)),
        };
        (Route { n: n as i64, kind }, perm, inv)
    }
}

/// RoPE `(cos, sin)` tables `[b, 1, t, hd/2]` for `b * t` positions; one function for the full
/// and the cached forward, so both rotate identically.
fn rope_tables(cfg: &ModelConfig, positions: &[f32], b: i64, t: i64, device: Device) -> (Tensor, Tensor) {
    let hd = cfg.head_dim();
    let pos = Tensor::from_slice(positions).to_device(device).view([b, 1, t, 1]);
    let inv_freq: Vec<f32> =
        (0..hd / 2).map(|i| (1.0 / cfg.rope_theta.powf((2 * i) as f64 / hd as f64)) as f32).collect();
    let inv_freq = Tensor::from_slice(&inv_freq).to_device(device).view([1, 1, 1, hd / 2]);
    let angles = pos * inv_freq;
    (angles.cos(), angles.sin())
}

/// A batch moved to the device in the model's layout, with everything attention needs.
#[derive(Debug)]
pub struct Prepared {
    pub route: Route,
    pub batch_size: i64,
    pub seq_len: i64,
    /// `[N]` int64 input ids, layout order.
    pub tokens: Tensor,
    /// `[N]` int64 target ids, layout order.
    pub targets: Tensor,
    /// `[N]` fp32 1/0 loss weights, layout order.
    pub loss_weight: Tensor,
    /// `[N]` int64 modality of each target, layout order.
    pub target_modality: Tensor,
    /// Loss-bearing tokens per target modality (host side, for averaging).
    pub loss_tokens: [i64; Modality::COUNT],
    /// `[B, 1, T, hd/2]` RoPE tables from the batch's positions, sequence order.
    cos: Tensor,
    sin: Tensor,
    /// `[B, 1, T, T]` bool: causal and inside one document, bidirectional among the patches of
    /// one latent image; None when plain causal suffices.
    mask: Option<Tensor>,
    /// Latent image patches (Transfusion setting); None when the batch has none.
    pub latent: Option<LatentInputs>,
}

/// The continuous image patches of a prepared batch and their noised versions.
#[derive(Debug)]
pub struct LatentInputs {
    pub dim: usize,
    /// `[P]` layout rows of the patch positions (patch order of `Batch::latents`).
    rows: Tensor,
    /// `[P, dim]` fp32 clean latents x_0 (the batch's latents times `latent_factor()`).
    pub x0: Tensor,
    /// Image index of each patch: an image is one latent segment within one row.
    pub image_of_patch: Vec<usize>,
    /// `[P]` int64 on the device, the same.
    image_index: Tensor,
    /// `[images]` fp32 patch count per image.
    image_patches: Tensor,
    /// Per image: loss-bearing tokens follow it in its document (the captioning case).
    pub followed_by_text: Vec<bool>,
    /// Per image: its row of the batch (training noise is drawn per row).
    pub row_of_image: Vec<usize>,
    /// Noised inputs `[P, dim]`, their timestep per image, and the true noise (training).
    xt: Option<Tensor>,
    pub timesteps: Vec<usize>,
    eps: Option<Tensor>,
}

impl LatentInputs {
    pub fn n_images(&self) -> usize {
        self.followed_by_text.len()
    }

    /// Sets the noised patches `xt` at per-image timesteps (one value = all images) and, for
    /// training, the noise the model must predict.
    pub fn set_noised(&mut self, xt: Tensor, timesteps: Vec<usize>, eps: Option<Tensor>) {
        self.timesteps = if timesteps.len() == 1 { vec![timesteps[0]; self.n_images()] } else { timesteps };
        self.xt = Some(xt);
        self.eps = eps;
    }

    /// `[P]` fp32 timestep of each patch (0 while not noised: clean conditioning).
    fn patch_timesteps(&self) -> Tensor {
        let t: Vec<f32> =
            self.image_of_patch.iter().map(|&i| self.timesteps.get(i).copied().unwrap_or(0) as f32).collect();
        Tensor::from_slice(&t).to_device(self.x0.device())
    }
}

impl Prepared {
    /// Lays out `batch` for `cfg`. All checks on user data happen here, so the layers
    /// themselves cannot fail on it.
    pub fn new(cfg: &ModelConfig, batch: &Batch, routing: Routing, device: Device) -> Result<Self, TrainError> {
        let n = batch.numel();
        let (b, t) = (batch.batch_size as i64, batch.seq_len as i64);
        for (name, len) in [
            ("inputs", batch.inputs.len()),
            ("targets", batch.targets.len()),
            ("modality", batch.modality.len()),
            ("target_modality", batch.target_modality.len()),
            ("positions", batch.positions.len()),
            ("doc_ids", batch.doc_ids.len()),
            ("loss_mask", batch.loss_mask.len()),
        ] {
            if len != n {
                return Err(TrainError::Batch(format!("{name} has {len} entries, expected batch_size*seq_len = {n}")));
            }
        }
        let lat = &batch.latents;
        let mut is_patch = vec![false; n];
        if !lat.positions.is_empty() {
            if i64::try_from(lat.dim).unwrap_or(-1) != cfg.latent_dim {
                return Err(TrainError::Batch(format!(
                    "latent patches of dimension {} but the model's latent_dim is {}",
                    lat.dim, cfg.latent_dim
                )));
            }
            if lat.data.len() != lat.positions.len() * lat.dim {
                return Err(TrainError::Batch(format!(
                    "{} latent values for {} patches of dimension {}",
                    lat.data.len(),
                    lat.positions.len(),
                    lat.dim
                )));
            }
            for &q in &lat.positions {
                let q = q as usize;
                if q >= n || is_patch[q] || batch.modality[q] != Modality::Image as u8 {
                    return Err(TrainError::Batch(format!("latent patch at flat position {q} is out of place")));
                }
                is_patch[q] = true;
            }
        }
        // Patch positions carry a placeholder id (replaced by the projected latent) and targets
        // without loss are never read: map both to id 0 so the lookup and the CE stay in range.
        let inputs: Vec<u32> = batch.inputs.iter().zip(&is_patch).map(|(&x, &pt)| if pt { 0 } else { x }).collect();
        let targets: Vec<u32> = batch
            .targets
            .iter()
            .zip(&batch.loss_mask)
            .map(|(&y, &w)| if w == 0 && i64::from(y) >= cfg.vocab_size { 0 } else { y })
            .collect();
        let vocab = cfg.vocab_size;
        for (i, (&x, &y)) in inputs.iter().zip(&targets).enumerate() {
            if i64::from(x) >= vocab || i64::from(y) >= vocab {
                return Err(TrainError::Batch(format!(
                    "token id {} at flat position {i} is outside the model vocabulary ({vocab})",
                    x.max(y)
                )));
            }
        }
        for (i, (&m, &tm)) in batch.modality.iter().zip(&batch.target_modality).enumerate() {
            if usize::from(m.max(tm)) >= Modality::COUNT {
                return Err(TrainError::Batch(format!("modality tag {} at flat position {i} is unknown", m.max(tm))));
            }
        }

        // Stable counting sort by input modality (perm, inv: host copies of the route's tables).
        type HostPerm = Option<(Vec<usize>, Vec<i64>)>;
        let (route, order): (Route, HostPerm) = if cfg.towers() == 1 {
            (Route::single(n as i64), None)
        } else {
            match routing {
                Routing::Sorted => {
                    let (route, perm, inv) = Route::sorted(&batch.modality, device, cfg.grouped_mm);
                    (route, Some((perm, inv)))
                }
                Routing::GatherScatter => {
                    let idx = (0..Modality::COUNT)
                        .map(|m| {
                            let rows: Vec<i64> =
                                (0..n).filter(|&i| usize::from(batch.modality[i]) == m).map(|i| i as i64).collect();
                            (!rows.is_empty()).then(|| Tensor::from_slice(&rows).to_device(device))
                        })
                        .collect();
                    (Route { n: n as i64, kind: RouteKind::Scatter { idx } }, None)
                }
            }
        };
        let layout = |v: &[u32]| -> Tensor {
            let data: Vec<i64> = match &order {
                Some((p, _)) => p.iter().map(|&i| i64::from(v[i])).collect(),
                None => v.iter().map(|&x| i64::from(x)).collect(),
            };
            Tensor::from_slice(&data).to_device(device)
        };
        let widen = |v: &[u8]| -> Vec<u32> { v.iter().map(|&x| u32::from(x)).collect() };
        let tokens = layout(&inputs);
        let targets = layout(&targets);
        let target_modality = layout(&widen(&batch.target_modality));
        let loss_weight = layout(&widen(&batch.loss_mask)).gt(0).to_kind(Kind::Float);
        let mut loss_tokens = [0i64; Modality::COUNT];
        for (&tm, &w) in batch.target_modality.iter().zip(&batch.loss_mask) {
            if w > 0 {
                loss_tokens[usize::from(tm)] += 1;
            }
        }

        // RoPE tables from the batch's per-document positions (sequence order).
        let pos: Vec<f32> = batch.positions.iter().map(|&p| p as f32).collect();
        let (cos, sin) = rope_tables(cfg, &pos, b, t, device);

        // A mask is only needed when some row packs more than one document or holds latent
        // images (bidirectional among one image's patches; text after it stays causal).
        let packed = batch.doc_ids.chunks(batch.seq_len.max(1)).any(|row| row.windows(2).any(|w| w[0] != w[1]));
        let has_latents = !lat.positions.is_empty();
        if has_latents && batch.segment_ids.len() != n {
            return Err(TrainError::Batch(format!(
                "segment_ids has {} entries, expected {n}",
                batch.segment_ids.len()
            )));
        }
        let mask = (packed || has_latents).then(|| {
            let docs: Vec<i64> = batch.doc_ids.iter().map(|&d| i64::from(d)).collect();
            let docs = Tensor::from_slice(&docs).to_device(device).view([b, t]);
            let same_doc = docs.unsqueeze(2).eq_tensor(&docs.unsqueeze(1));
            let mut allowed = Tensor::ones([t, t], (Kind::Bool, device)).tril(0);
            if has_latents {
                // Patches of one image: same segment id, both latent positions.
                let segs: Vec<i64> = batch
                    .segment_ids
                    .iter()
                    .zip(&is_patch)
                    .map(|(&s, &pt)| if pt { i64::from(s) } else { -1 })
                    .collect();
                let segs = Tensor::from_slice(&segs).to_device(device).view([b, t]);
                let same_image = segs.unsqueeze(2).eq_tensor(&segs.unsqueeze(1)).logical_and(&segs.ge(0).unsqueeze(2));
                allowed = allowed.logical_or(&same_image);
            }
            (same_doc.logical_and(&allowed)).unsqueeze(1)
        });
        let latent = has_latents.then(|| {
            let tlen = batch.seq_len.max(1);
            // Images: runs of patches sharing (row, segment id), in patch order.
            let mut image_of_patch = Vec::with_capacity(lat.positions.len());
            let mut followed_by_text = Vec::new();
            let mut row_of_image = Vec::new();
            let mut key = None;
            for &q in &lat.positions {
                let q = q as usize;
                let k = (q / tlen, batch.segment_ids[q]);
                if key != Some(k) {
                    key = Some(k);
                    // Loss-bearing input later in the row, same document, another segment, not a
                    // patch: text the (noised) image conditions.
                    let row_end = (q / tlen + 1) * tlen;
                    let followed = (q + 1..row_end).any(|j| {
                        batch.doc_ids[j] == batch.doc_ids[q]
                            && batch.segment_ids[j] != k.1
                            && !is_patch[j]
                            && batch.loss_mask[j] > 0
                    });
                    followed_by_text.push(followed);
                    row_of_image.push(q / tlen);
                }
                image_of_patch.push(followed_by_text.len() - 1);
            }
            // Layout row of each patch (the inverse of the sort permutation, if any).
            let rows: Vec<i64> = match &order {
                Some((_, inv)) => lat.positions.iter().map(|&q| inv[q as usize]).collect(),
                None => lat.positions.iter().map(|&q| i64::from(q)).collect(),
            };
            let scale = cfg.latent_factor() as f32;
            let x0: Vec<f32> = lat.data.iter().map(|v| v.to_f32() * scale).collect();
            let mut counts = vec![0f32; followed_by_text.len()];
            for &i in &image_of_patch {
                counts[i] += 1.0;
            }
            let idx: Vec<i64> = image_of_patch.iter().map(|&i| i as i64).collect();
            LatentInputs {
                dim: lat.dim,
                rows: Tensor::from_slice(&rows).to_device(device),
                x0: Tensor::from_slice(&x0).view([lat.positions.len() as i64, lat.dim as i64]).to_device(device),
                image_of_patch,
                image_index: Tensor::from_slice(&idx).to_device(device),
                image_patches: Tensor::from_slice(&counts).to_device(device),
                followed_by_text,
                row_of_image,
                xt: None,
                timesteps: Vec::new(),
                eps: None,
            }
        });
        Ok(Prepared {
            route,
            batch_size: b,
            seq_len: t,
            tokens,
            targets,
            loss_weight,
            target_modality,
            loss_tokens,
            cos,
            sin,
            mask,
            latent,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Building blocks: towers of untied weights, norms, linears
// ---------------------------------------------------------------------------------------

/// One variable per tower, for the final norm and LM head, which run per tower on whole
/// slices (the block's sites are [`Stacked`]). A single tower is named without a modality
/// suffix (`lm_head.weight`), several are named by modality (`lm_head.image.weight`).
#[derive(Debug)]
struct Towers<T>(Vec<T>);

impl<T> Towers<T> {
    fn new(p: &nn::Path, n: usize, make: impl Fn(&nn::Path) -> T) -> Self {
        if n == 1 {
            Towers(vec![make(p)])
        } else {
            Towers(Modality::ALL[..n].iter().map(|m| make(&(p / m.as_str()))).collect())
        }
    }

    /// Tower `m`'s weights (the only tower when untied weights are not in use).
    fn pick(&self, m: usize) -> &T {
        &self.0[m.min(self.0.len() - 1)]
    }
}

/// A bias-free linear layer whose matmul runs in the compute precision.
#[derive(Debug)]
struct Linear {
    weight: Tensor,
}

impl Linear {
    fn new(p: &nn::Path, d_in: i64, d_out: i64, std: f64) -> Self {
        Linear { weight: p.var("weight", &[d_out, d_in], nn::Init::Randn { mean: 0.0, stdev: std }) }
    }

    fn forward(&self, x: &Tensor, ck: Kind) -> Tensor {
        x.to_kind(ck).linear::<Tensor>(&self.weight.to_kind(ck), None)
    }
}

/// RMSNorm over the last dimension, computed in fp32.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm { weight: p.var("weight", &[dim], nn::Init::Const(1.0)), eps }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let dim = self.weight.size()[0];
        x.to_kind(Kind::Float).rms_norm([dim], Some(&self.weight), self.eps)
    }
}

/// Weightless RMSNorm over the last dimension, in fp32.
fn rms(x: &Tensor, eps: f64) -> Tensor {
    let dim = x.size()[x.dim() - 1];
    x.to_kind(Kind::Float).rms_norm([dim], None::<Tensor>, eps)
}

/// Suffix of a VarStore name that holds several named tensors stacked (see [`Stacked`]).
const STACKED: &str = "stacked";

/// One parameter site: every tower's weights of one or more parts (projections, or norm
/// weights) in one leaf tensor `[towers, Σ part rows, ...]`, tower m's rows being `parts[0]`'s,
/// then `parts[1]`'s... A step reads, accumulates and updates one tensor per site instead of
/// one per tower and part, and the weights reach the matmul with no concatenation: launch
/// counts of MoT stay close to dense's (FSDP's flat parameters, per site).
///
/// The VarStore names it `<path>.<part>+<part>.stacked`, which encodes the layout, so
/// [`public_views`] can present the per-tower tensors under their usual names
/// (`q_proj.image.weight`) to checkpoints without the model at hand.
#[derive(Debug)]
struct Stacked {
    /// `[towers, n_parts * part[0], part[1..]]`.
    weight: Tensor,
}

impl Stacked {
    /// Parts of shape `part` (`[out, in]` for projections, `[dim]` for norm weights) for `towers`
    /// towers. `std: Some` draws N(0, std²) part by part, tower by tower, as one variable per
    /// tower and part would (so seeded weights do not depend on the storage layout); None
    /// initializes to ones (norms).
    fn new(p: &nn::Path, parts: &[&str], towers: usize, part: &[i64], std: Option<f64>) -> Self {
        let opts = (Kind::Float, p.device());
        let draws: Vec<Vec<Tensor>> = parts
            .iter()
            .map(|_| {
                (0..towers)
                    .map(|_| match std {
                        Some(s) => Tensor::randn(part, opts) * s + 0.0,
                        None => Tensor::ones(part, opts),
                    })
                    .collect()
            })
            .collect();
        let rows: Vec<&Tensor> = (0..towers).flat_map(|m| draws.iter().map(move |d| &d[m])).collect();
        let mut shape = part.to_vec();
        shape[0] *= parts.len() as i64;
        shape.insert(0, towers as i64);
        let init = Tensor::cat(&rows, 0).view(shape.as_slice());
        Stacked { weight: (p / parts.join("+")).var_copy(STACKED, &init) }
    }

    fn towers(&self) -> i64 {
        self.weight.size()[0]
    }
}

/// A VarStore tensor `t` of variable `name` — the weights, or anything shaped like them
/// (gradients, optimizer moments) — as the named tensors a checkpoint holds: a [`Stacked`]
/// site becomes one view per tower and part (`layers.0.attn.q_proj.image.weight`, or
/// `q_proj.weight` with one tower); any other variable passes through. The views share
/// memory with `t`, so copying into them loads `t`.
pub fn public_views(name: &str, t: &Tensor) -> Vec<(String, Tensor)> {
    let Some(site) = name.strip_suffix(STACKED).and_then(|s| s.strip_suffix('.')) else {
        return vec![(name.to_string(), t.shallow_clone())];
    };
    let (prefix, parts) = site.rsplit_once('.').map_or(("", site), |(pre, last)| (pre, last));
    let parts: Vec<&str> = parts.split('+').collect();
    let size = t.size();
    let (towers, len) = (size[0], size.get(1).copied().unwrap_or(0) / parts.len() as i64);
    let dot = if prefix.is_empty() { "" } else { "." };
    tch::no_grad(|| {
        let mut out = Vec::with_capacity(towers as usize * parts.len());
        for m in 0..towers {
            let tower = match Modality::ALL.get(m as usize) {
                _ if towers == 1 => String::new(),
                Some(modality) => format!(".{}", modality.as_str()),
                None => format!(".{m}"),
            };
            for (j, part) in parts.iter().enumerate() {
                out.push((format!("{prefix}{dot}{part}{tower}.weight"), t.get(m).narrow(0, j as i64 * len, len)));
            }
        }
        out
    })
}

/// Every variable of `vs` under its checkpoint name (see [`public_views`]), in name order.
pub fn public_parameters(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().iter().flat_map(|(n, t)| public_views(n, t)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Per-tower RMSNorm weights as one stacked leaf: `[towers, dim]`, or `[towers, n * dim]` for
/// n norms kept together (QK-norm's q and k).
#[derive(Debug)]
struct TowerNorm {
    site: Stacked,
    eps: f64,
}

impl TowerNorm {
    fn new(p: &nn::Path, names: &[&str], towers: usize, dim: i64, eps: f64) -> Self {
        TowerNorm { site: Stacked::new(p, names, towers, &[dim], None), eps }
    }

    /// `[towers, dim]`.
    fn weight(&self) -> &Tensor {
        &self.site.weight
    }

    /// The per-tower norm of `x` (`[N, dim]` layout order): one weightless norm over all rows
    /// (fp32), then each tower's weight on its rows.
    fn forward(&self, route: &Route, x: &Tensor) -> Tensor {
        let w = self.weight();
        if self.site.towers() == 1 {
            return self.forward_single(x);
        }
        rms(x, self.eps) * route.per_row(w)
    }

    /// Tower 0's norm on all rows (one tower, or MoE, whose models have one tower of norms).
    fn forward_single(&self, x: &Tensor) -> Tensor {
        let w = self.weight();
        // squeeze is a view both ways; select would zero-fill a `[towers, dim]` gradient.
        let w0 = if self.site.towers() == 1 { w.squeeze_dim(0) } else { w.get(0) };
        x.to_kind(Kind::Float).rms_norm([w.size()[1]], Some(&w0), self.eps)
    }
}

/// The site's weights `[towers, Σ out, in]` in the compute kind, with a pre-norm's per-tower
/// weight folded in: `W·diag(g)` applied to the weightless norm of x equals `W` applied to
/// `norm(x)·g`, and scales the small weight instead of every row.
fn site_weight(site: &Stacked, fold: Option<&TowerNorm>, ck: Kind) -> Tensor {
    match fold {
        Some(n) => (&site.weight * n.weight().unsqueeze(1)).to_kind(ck),
        None => site.weight.to_kind(ck),
    }
}

/// Rotates query/key pairs `[B, H, T, hd]` by the per-token angles (llama's half split).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let kind = x.kind();
    let x = x.to_kind(Kind::Float);
    let (x1, x2) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    Tensor::cat(&[&x1 * cos - &x2 * sin, &x1 * sin + &x2 * cos], 3).to_kind(kind)
}

// ---------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------

/// Multi-head attention: per-tower Q/K/V/O (and QK-norm), one global softmax.
#[derive(Debug)]
struct Attention {
    /// `q_proj+k_proj+v_proj`: `[towers, 3D, D]`.
    qkv_proj: Stacked,
    /// `[towers, D, D]`.
    o_proj: Stacked,
    /// `q_norm+k_norm`: `[towers, 2 * head_dim]`.
    qk_norm: Option<TowerNorm>,
    n_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: &nn::Path, cfg: &ModelConfig) -> Self {
        let (d, t, std) = (cfg.d_model, cfg.towers(), cfg.init_std);
        let out_std = std / (2.0 * cfg.n_layers as f64).sqrt();
        let hd = cfg.head_dim();
        Attention {
            qkv_proj: Stacked::new(p, &["q_proj", "k_proj", "v_proj"], t, &[d, d], Some(std)),
            o_proj: Stacked::new(p, &["o_proj"], t, &[d, d], Some(out_std)),
            qk_norm: cfg.qk_norm.then(|| TowerNorm::new(p, &["q_norm", "k_norm"], t, hd, cfg.norm_eps)),
            n_heads: cfg.n_heads,
            head_dim: hd,
        }
    }

    /// `x`: `[N, D]` layout order → `[N, D]` layout order. `pre` / `post` are the block's
    /// per-tower attention norm (pre-norm or swin placement).
    fn forward(&self, x: &Tensor, p: &Prepared, ck: Kind, pre: Option<&TowerNorm>, post: Option<&TowerNorm>) -> Tensor {
        let (h, hd) = (self.n_heads, self.head_dim);
        let qkv = self.project_in(&p.route, x, ck, pre);
        // One scatter restores sequence order for q, k and v together.
        let qkv = p.route.to_seq(&qkv).view([p.batch_size, p.seq_len, 3, h, hd]).permute([2, 0, 3, 1, 4]);
        let qkv = qkv.unbind(0);
        let q = apply_rope(&qkv[0], &p.cos, &p.sin);
        let k = apply_rope(&qkv[1], &p.cos, &p.sin);
        let y =
            Tensor::scaled_dot_product_attention(&q, &k, &qkv[2], p.mask.as_ref(), 0.0, p.mask.is_none(), None, false);
        let y = p.route.from_seq(&y.transpose(1, 2).reshape([p.route.len(), h * hd]));
        self.project_out(&p.route, &y, ck, post)
    }

    /// Residual rows → `[N, 3D]` q | k | v (compute kind, layout order): the pre-norm over
    /// all rows at once (its per-tower weight folded into the projection), one Q|K|V matmul
    /// per tower, QK-norm.
    fn project_in(&self, route: &Route, x: &Tensor, ck: Kind, pre: Option<&TowerNorm>) -> Tensor {
        let xs = match pre {
            Some(n) => rms(x, n.eps),
            None => x.shallow_clone(),
        };
        let qkv = route.matmul(&xs.to_kind(ck), &site_weight(&self.qkv_proj, pre, ck));
        let Some(qkn) = &self.qk_norm else { return qkv };
        let (rows, h, hd) = (x.size()[0], self.n_heads, self.head_dim);
        let d = h * hd;
        // q and k normalized together: `[N, 2, H, hd]`, per-tower weights `[towers, 2, 1, hd]`.
        let parts = qkv.split_with_sizes([2 * d, d], 1);
        let g = qkn.weight().view([-1, 2, 1, hd]);
        let qk = rms(&parts[0].reshape([rows, 2, h, hd]), qkn.eps) * route.per_row(&g);
        Tensor::cat(&[qk.reshape([rows, 2 * d]).to_kind(ck), parts[1].shallow_clone()], 1)
    }

    /// Attention output rows (layout order) → per-tower O projection, then the swin norm.
    fn project_out(&self, route: &Route, y: &Tensor, ck: Kind, post: Option<&TowerNorm>) -> Tensor {
        let o = route.matmul(&y.to_kind(ck), &site_weight(&self.o_proj, None, ck));
        match post {
            Some(n) => n.forward(route, &o),
            None => o,
        }
    }
}

/// Incremental decoding: the new tokens' queries attend over the cached keys and values.
impl Attention {
    /// Like [`Attention::forward`] for one sequence (batch 1) whose earlier tokens' keys and
    /// values are in `kv` (`[1, H, L, hd]`, RoPE applied, compute precision). The new rows'
    /// keys and values are appended to `kv`. `x`: `[T, D]` layout order of `s.route`.
    fn forward_cached(
        &self,
        x: &Tensor,
        s: &Step,
        kv: &mut Option<(Tensor, Tensor)>,
        ck: Kind,
        pre: Option<&TowerNorm>,
        post: Option<&TowerNorm>,
    ) -> Tensor {
        let (h, hd) = (self.n_heads, self.head_dim);
        let t = s.route.len();
        let qkv = self.project_in(&s.route, x, ck, pre);
        let qkv = s.route.to_seq(&qkv).view([1, t, 3, h, hd]).permute([2, 0, 3, 1, 4]).unbind(0);
        let q = apply_rope(&qkv[0], &s.cos, &s.sin);
        let k = apply_rope(&qkv[1], &s.cos, &s.sin);
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2), Tensor::cat(&[&pv, &qkv[2]], 2)),
            None => (k.contiguous(), qkv[2].contiguous()),
        };
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, s.mask.as_ref(), 0.0, s.causal, None, false);
        *kv = Some((k, v));
        let y = s.route.from_seq(&y.transpose(1, 2).reshape([t, h * hd]));
        self.project_out(&s.route, &y, ck, post)
    }
}

// ---------------------------------------------------------------------------------------
// FFN: SwiGLU, per tower or as a mixture of experts
// ---------------------------------------------------------------------------------------

/// `down(silu(gate(x)) * up(x))`, one weight set per tower.
#[derive(Debug)]
struct SwiGlu {
    /// `gate_proj+up_proj`: `[towers, 2F, D]`.
    gate_up_proj: Stacked,
    /// `[towers, D, F]`.
    down_proj: Stacked,
}

impl SwiGlu {
    fn new(p: &nn::Path, cfg: &ModelConfig, towers: usize) -> Self {
        let (d, f, std) = (cfg.d_model, cfg.ffn_dim(), cfg.init_std);
        let out_std = std / (2.0 * cfg.n_layers as f64).sqrt();
        SwiGlu {
            gate_up_proj: Stacked::new(p, &["gate_proj", "up_proj"], towers, &[f, d], Some(std)),
            down_proj: Stacked::new(p, &["down_proj"], towers, &[d, f], Some(out_std)),
        }
    }

    /// `down(silu(gate(x)) * up(x))` per tower on the rows of `x` (layout order), with the
    /// block's norm before (pre-norm, folded into gate|up) or after (swin) it. Only the
    /// matmuls run per tower.
    fn forward(
        &self,
        route: &Route,
        x: &Tensor,
        ck: Kind,
        pre: Option<&TowerNorm>,
        post: Option<&TowerNorm>,
    ) -> Tensor {
        let xs = match pre {
            Some(n) => rms(x, n.eps),
            None => x.shallow_clone(),
        };
        let f = self.down_proj.weight.size()[2];
        let gu = route.matmul(&xs.to_kind(ck), &site_weight(&self.gate_up_proj, pre, ck));
        let gu = gu.split(f, 1);
        let y = route.matmul(&(gu[0].silu() * &gu[1]), &site_weight(&self.down_proj, None, ck));
        match post {
            Some(n) => n.forward(route, &y),
            None => y,
        }
    }
}

/// MoE-4x: `n_experts` SwiGLU experts of the dense FFN's size and a linear router.
#[derive(Debug)]
struct Moe {
    router: Linear,
    experts: Vec<SwiGlu>,
    routing: MoeRouting,
    top_k: i64,
    capacity_factor: f64,
}

impl Moe {
    fn new(p: &nn::Path, cfg: &ModelConfig) -> Self {
        let e = cfg.n_experts;
        Moe {
            router: Linear::new(&(p / "router"), cfg.d_model, e, cfg.init_std),
            experts: (0..e).map(|i| SwiGlu::new(&(p / "experts" / i), cfg, 1)).collect(),
            routing: cfg.moe_routing,
            top_k: cfg.moe_top_k,
            capacity_factor: cfg.moe_capacity_factor,
        }
    }

    /// Returns the output and the load-balancing loss (zero for expert choice).
    ///
    /// Expert choice ranks the router scores of all `N` rows passed in, which in training are
    /// every token of the batch (all rows, all positions): whether a token reaches an expert
    /// depends on later tokens and other sequences, i.e. it is not causal. Decoding one token
    /// would make it every expert's top choice, so [`Model::check_decodable`] refuses it.
    fn forward(&self, x: &Tensor, ck: Kind) -> (Tensor, Tensor) {
        let n = x.size()[0];
        let e = self.experts.len() as i64;
        let probs = self.router.forward(x, Kind::Float).softmax(-1, Kind::Float); // [N, E]
        let mut out = Tensor::zeros([n, x.size()[1]], (Kind::Float, x.device()));
        match self.routing {
            MoeRouting::ExpertChoice => {
                // Each expert takes its C highest-scoring tokens (Zhou et al. 2022).
                let c = ((self.capacity_factor * n as f64 / e as f64).ceil() as i64).clamp(1, n);
                let (gates, idx) = probs.tr().topk(c, 1, true, false); // [E, C]
                for (i, expert) in self.experts.iter().enumerate() {
                    let rows = idx.get(i as i64);
                    let y = expert
                        .forward(&Route::single(c), &x.index_select(0, &rows), ck, None, None)
                        .to_kind(Kind::Float);
                    out = out.index_add(0, &rows, &(y * gates.get(i as i64).unsqueeze(1)));
                }
                (out, Tensor::zeros([], (Kind::Float, x.device())))
            }
            MoeRouting::TokenChoice => {
                let k = self.top_k;
                let (gates, experts) = probs.topk(k, 1, true, false); // [N, k]
                // Top-1 keeps the raw router probability as the gate (Switch Transformer):
                // renormalized, every gate would be exactly 1 with zero gradient, and only the
                // balance loss would train the router. With k > 1 the renormalized gates still
                // depend on the router's scores (Mixtral).
                let gates = if k > 1 { &gates / gates.sum_dim_intlist(1, true, Kind::Float) } else { gates };
                let flat = experts.reshape([-1]);
                let order = flat.argsort_stable(true, 0, false);
                // Per-expert sizes are needed on the host to split: one sync per layer,
                // the documented cost of token choice.
                let counts: Vec<i64> = Vec::<i64>::try_from(flat.bincount::<Tensor>(None, e)).unwrap_or_default();
                let token_of = order.divide_scalar_mode(k, "floor");
                let gate_of = gates.reshape([-1]).index_select(0, &order);
                let mut start = 0;
                for (i, expert) in self.experts.iter().enumerate() {
                    let len = counts.get(i).copied().unwrap_or(0);
                    if len == 0 {
                        continue;
                    }
                    let rows = token_of.narrow(0, start, len);
                    let y = expert
                        .forward(&Route::single(len), &x.index_select(0, &rows), ck, None, None)
                        .to_kind(Kind::Float);
                    out = out.index_add(0, &rows, &(y * gate_of.narrow(0, start, len).unsqueeze(1)));
                    start += len;
                }
                // Switch-style balance: E * sum_e (fraction routed to e) * (mean prob of e).
                let frac = Tensor::from_slice(&counts).to_device(x.device()).to_kind(Kind::Float) / (n * k) as f64;
                let mean_p = probs.mean_dim(0, false, Kind::Float);
                (out, (frac * mean_p).sum(Kind::Float) * e as f64)
            }
        }
    }
}

#[derive(Debug)]
enum Ffn {
    SwiGlu(SwiGlu),
    Moe(Moe),
}

// ---------------------------------------------------------------------------------------
// Block
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Block {
    attn_norm: TowerNorm,
    attn: Attention,
    ffn_norm: TowerNorm,
    ffn: Ffn,
    placement: NormPlacement,
}

impl Block {
    fn new(p: &nn::Path, cfg: &ModelConfig) -> Self {
        let t = cfg.towers();
        let ffn = match cfg.arch {
            Arch::Moe => Ffn::Moe(Moe::new(&(p / "ffn"), cfg)),
            _ => Ffn::SwiGlu(SwiGlu::new(&(p / "ffn"), cfg, t)),
        };
        Block {
            attn_norm: TowerNorm::new(p, &["attn_norm"], t, cfg.d_model, cfg.norm_eps),
            attn: Attention::new(&(p / "attn"), cfg),
            ffn_norm: TowerNorm::new(p, &["ffn_norm"], t, cfg.d_model, cfg.norm_eps),
            ffn,
            placement: cfg.norm,
        }
    }

    /// Residual stream `x` (`[N, D]` fp32, layout order) → next residual stream, plus aux loss.
    fn forward(&self, x: &Tensor, p: &Prepared, ck: Kind) -> (Tensor, Option<Tensor>) {
        let (an, fnorm) = (&self.attn_norm, &self.ffn_norm);
        let (attn_pre, attn_post, ffn_pre, ffn_post) = match self.placement {
            NormPlacement::Pre => (Some(an), None, Some(fnorm), None),
            NormPlacement::Swin => (None, Some(an), None, Some(fnorm)),
        };
        let a = self.attn.forward(x, p, ck, attn_pre, attn_post);
        let h = x + a.to_kind(Kind::Float);
        let (f, aux) = match &self.ffn {
            Ffn::SwiGlu(f) => (f.forward(&p.route, &h, ck, ffn_pre, ffn_post), None),
            Ffn::Moe(m) => {
                // MoE models have one tower of norms, applied to all tokens.
                let hn = ffn_pre.map_or_else(|| h.shallow_clone(), |n| n.forward_single(&h));
                let (y, aux) = m.forward(&hn, ck);
                (ffn_post.map_or(y.shallow_clone(), |n| n.forward_single(&y)), Some(aux))
            }
        };
        (&h + f.to_kind(Kind::Float), aux)
    }
}

// ---------------------------------------------------------------------------------------
// Latent patches (Transfusion setting)
// ---------------------------------------------------------------------------------------

/// In: a noised patch `x_t` becomes `latent_in(x_t) + time_embed(t)` at its position (in place
/// of the placeholder embedding). Out: the final hidden state there, through the image tower's
/// final norm and `latent_out`, is the predicted noise.
#[derive(Debug)]
struct LatentHead {
    latent_in: Linear,
    latent_out: Linear,
    /// Sinusoidal features of t (d_model wide) → fc1 → SiLU → fc2.
    time_fc1: Linear,
    time_fc2: Linear,
    d_model: i64,
}

impl LatentHead {
    fn new(p: &nn::Path, cfg: &ModelConfig) -> Self {
        let (d, l, std) = (cfg.d_model, cfg.latent_dim, cfg.init_std);
        LatentHead {
            latent_in: Linear::new(&(p / "latent_in"), l, d, std),
            latent_out: Linear::new(&(p / "latent_out"), d, l, std),
            time_fc1: Linear::new(&(p / "time_embed" / "fc1"), d, d, std),
            time_fc2: Linear::new(&(p / "time_embed" / "fc2"), d, d, std),
            d_model: d,
        }
    }

    /// `[P]` fp32 timesteps → `[P, D]` embeddings (cos | sin halves, periods up to 10,000).
    fn time_embed(&self, t: &Tensor, ck: Kind) -> Tensor {
        let half = self.d_model / 2;
        let freqs = (Tensor::arange(half, (Kind::Float, t.device())) * (-(10_000f64.ln()) / half as f64)).exp();
        let args = t.unsqueeze(1) * freqs.unsqueeze(0);
        let mut feats = Tensor::cat(&[args.cos(), args.sin()], 1);
        if self.d_model % 2 == 1 {
            feats = Tensor::cat(&[feats, Tensor::zeros([t.size()[0], 1], (Kind::Float, t.device()))], 1);
        }
        self.time_fc2.forward(&self.time_fc1.forward(&feats, ck).silu(), ck).to_kind(Kind::Float)
    }

    /// `[P, D]` fp32 input embeddings of the patches.
    fn embed(&self, lat: &LatentInputs, ck: Kind) -> Tensor {
        let x = lat.xt.as_ref().unwrap_or(&lat.x0);
        self.latent_in.forward(x, ck).to_kind(Kind::Float) + self.time_embed(&lat.patch_timesteps(), ck)
    }
}

// ---------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------

/// Loss of one forward pass.
#[derive(Debug)]
pub struct LossOutput {
    /// Scalar to backpropagate: mean next-token loss over loss-bearing tokens (+ MoE aux).
    pub loss: Tensor,
    /// `[3]` detached sums of token losses per target modality (divide by `loss_tokens`).
    pub per_modality_sum: Tensor,
    /// `[N]` per-token losses, layout order, detached (zero where the mask is 0).
    pub token_loss: Tensor,
    /// Mean next-token loss (+ MoE aux): the `L_LM` part of `loss`.
    pub lm_loss: Tensor,
    /// Transfusion: mean over images of each image's mean squared noise error (`L_DDPM`, before
    /// λ); None without noised latent patches.
    pub diffusion_loss: Option<Tensor>,
    /// `[images]` detached per-image diffusion losses (for the per-timestep-bucket metrics).
    pub image_diffusion: Option<Tensor>,
}

/// The whole network. Parameters live in the `VarStore` passed to [`Model::new`].
#[derive(Debug)]
pub struct Model {
    pub cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Block>,
    final_norm: Towers<RmsNorm>,
    lm_head: Towers<Linear>,
    latent: Option<LatentHead>,
    /// Matmul / attention precision (bf16 on CUDA, fp32 on CPU).
    pub compute_kind: Kind,
}

/// Serializes "seed torch's global generator, then draw the initial weights": two threads doing
/// it at once (parallel tests, several models in one process) would interleave their draws.
static SEEDED_INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs one small grouped GEMM forward and backward at the model's widths, so a device or
/// kind without the op is a config error at start-up rather than a failure mid-training.
fn probe_grouped_mm(cfg: &ModelConfig, device: Device, kind: Kind) -> Result<(), TrainError> {
    // torch's grouped GEMM kernel exists for sm_90 and sm_100; elsewhere (A100: sm_80) the op
    // falls back to a loop over groups that first copies the offsets to the host: a sync per
    // projection, slower than the per-tower matmuls. Refuse rather than run that silently.
    if let Device::Cuda(i) = device
        && let Some((major, minor)) = crate::ops::cuda_capability(i)
        && !(9..=10).contains(&major)
    {
        return Err(TrainError::Config {
            path: "model.grouped_mm".into(),
            msg: format!(
                "this GPU is sm_{major}{minor}; torch's grouped GEMM kernel needs sm_90 or sm_100 (elsewhere it \
                 loops over the groups after a device-to-host sync); set grouped_mm = false"
            ),
        });
    }
    let fail = |e: tch::TchError| TrainError::Config {
        path: "model.grouped_mm".into(),
        msg: format!("grouped GEMM does not run on {device:?} in {kind:?}: {e}"),
    };
    let towers = cfg.towers() as i64;
    let (d, f) = (cfg.d_model, cfg.ffn_dim());
    let ends: Vec<i32> = (1..=towers).map(|m| (8 * m) as i32).collect();
    let ends = Tensor::from_slice(&ends).to_device(device);
    let x = Tensor::ones([8 * towers, d], (kind, device)).set_requires_grad(true);
    let w = Tensor::ones([towers, f, d], (kind, device)).set_requires_grad(true);
    let y = x.f_internal_grouped_mm(&w.transpose(1, 2), Some(&ends), None::<&Tensor>, None).map_err(fail)?;
    // Square, so the incoming gradient is a dense tensor as in the model (not sum's expanded one).
    y.f_square().map_err(fail)?.f_sum(Kind::Float).map_err(fail)?.f_backward().map_err(fail)
}

impl Model {
    /// Seeds torch's global generator and creates the model while no other seeded
    /// initialization can draw from it: the same seed always gives the same weights.
    pub fn new_seeded(root: &nn::Path, cfg: &ModelConfig, seed: i64) -> Result<Self, TrainError> {
        let _guard = SEEDED_INIT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tch::manual_seed(seed);
        Model::build(root, cfg)
    }

    /// Creates every parameter under `root`; initialization draws from torch's generator
    /// (under the same lock, so it cannot disturb a seeded initialization running beside it),
    /// so prefer [`Model::new_seeded`] for a reproducible model.
    pub fn new(root: &nn::Path, cfg: &ModelConfig) -> Result<Self, TrainError> {
        let _guard = SEEDED_INIT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Model::build(root, cfg)
    }

    fn build(root: &nn::Path, cfg: &ModelConfig) -> Result<Self, TrainError> {
        cfg.validate()?;
        let head_towers = if cfg.untie_head { cfg.towers() } else { 1 };
        let embed = (root / "embed").var(
            "weight",
            &[cfg.vocab_size, cfg.d_model],
            nn::Init::Randn { mean: 0.0, stdev: cfg.init_std },
        );
        let layers = (0..cfg.n_layers).map(|i| Block::new(&(root / "layers" / i), cfg)).collect();
        let final_norm = Towers::new(&(root / "norm"), head_towers, |p| RmsNorm::new(p, cfg.d_model, cfg.norm_eps));
        let lm_head = Towers::new(&(root / "lm_head"), head_towers, |p| {
            Linear::new(p, cfg.d_model, cfg.vocab_size, cfg.init_std)
        });
        let latent = (cfg.latent_dim > 0).then(|| LatentHead::new(root, cfg));
        let compute_kind = if root.device().is_cuda() { Kind::BFloat16 } else { Kind::Float };
        if cfg.grouped_mm && cfg.towers() > 1 {
            probe_grouped_mm(cfg, root.device(), compute_kind)?;
        }
        Ok(Model { cfg: cfg.clone(), embed, layers, final_norm, lm_head, latent, compute_kind })
    }

    /// Residual stream after the last block `[N, D]` (fp32, before the final norm), layout
    /// order; plus the summed MoE aux loss if any.
    pub fn hidden(&self, p: &Prepared) -> (Tensor, Option<Tensor>) {
        let mut x = Tensor::embedding(&self.embed, &p.tokens, -1, false, false);
        if let (Some(head), Some(lat)) = (&self.latent, &p.latent) {
            x = x.index_copy(0, &lat.rows, &head.embed(lat, self.compute_kind));
        }
        let mut aux: Option<Tensor> = None;
        for layer in &self.layers {
            let (y, a) = layer.forward(&x, p, self.compute_kind);
            x = y;
            if let Some(a) = a {
                aux = Some(match aux {
                    Some(s) => s + a,
                    None => a,
                });
            }
        }
        (x, aux)
    }

    /// Final norm and LM head of tower `m` on rows `xs` → fp32 logits.
    fn head(&self, m: usize, xs: &Tensor) -> Tensor {
        self.lm_head.pick(m).forward(&self.final_norm.pick(m).forward(xs), self.compute_kind).to_kind(Kind::Float)
    }

    /// Logits `[N, V]` (fp32), layout order. For inspection and sampling; the loss path
    /// never materializes all towers' logits at once.
    pub fn logits(&self, p: &Prepared) -> Tensor {
        let (x, _) = self.hidden(p);
        if self.lm_head.0.len() == 1 { self.head(0, &x) } else { p.route.map(&x, |m, xs| self.head(m, xs)) }
    }

    /// Predicted noise `[P, latent_dim]` (fp32) at the patches of `h`, the final hidden state.
    fn noise_from_hidden(&self, head: &LatentHead, lat: &LatentInputs, h: &Tensor) -> Tensor {
        let xs = self.final_norm.pick(Modality::Image.index()).forward(&h.index_select(0, &lat.rows));
        head.latent_out.forward(&xs, self.compute_kind).to_kind(Kind::Float)
    }

    /// The model's noise prediction for the batch's (noised) latent patches, `[P, latent_dim]`
    /// in `Batch::latents` order; empty without latents or a latent head.
    pub fn predict_noise(&self, p: &Prepared) -> Tensor {
        let (Some(head), Some(lat)) = (&self.latent, &p.latent) else {
            return Tensor::zeros([0, self.cfg.latent_dim.max(0)], (Kind::Float, self.embed.device()));
        };
        let (x, _) = self.hidden(p);
        self.noise_from_hidden(head, lat, &x)
    }

    /// `L = L_LM + λ·L_DDPM`: next-token cross-entropy (per token and per target modality) and,
    /// with noised latent patches, the per-image mean squared error of the predicted noise.
    pub fn loss(&self, p: &Prepared) -> LossOutput {
        let (x, aux) = self.hidden(p);
        let diffusion = match (&self.latent, &p.latent) {
            (Some(head), Some(lat)) => lat.eps.as_ref().map(|eps| {
                let per_patch = (self.noise_from_hidden(head, lat, &x) - eps).square().mean_dim(1, false, Kind::Float);
                let n_img = lat.n_images() as i64;
                let per_image = Tensor::zeros([n_img], (Kind::Float, per_patch.device())).index_add(
                    0,
                    &lat.image_index,
                    &per_patch,
                ) / &lat.image_patches;
                (per_image.mean(Kind::Float), per_image.detach())
            }),
            _ => None,
        };
        // Per-tower logits and CE over that tower's rows: targets are already in layout order.
        let ce = |m: usize, xs: &Tensor, ts: &Tensor| -> Tensor {
            self.head(m, xs).cross_entropy_loss::<Tensor>(ts, None, tch::Reduction::None, -100, 0.0)
        };
        let token_loss = if self.lm_head.0.len() == 1 {
            ce(0, &x, &p.targets)
        } else {
            let parts = p
                .route
                .split(&x)
                .into_iter()
                .zip(p.route.split(&p.targets))
                .map(|((m, xs), (_, ts))| (m, ce(m, &xs, &ts)))
                .collect();
            p.route.combine(parts)
        };
        let weighted = &token_loss * &p.loss_weight;
        let count: i64 = p.loss_tokens.iter().sum();
        let mut lm_loss = weighted.sum(Kind::Float) / count.max(1) as f64;
        if let Some(a) = aux {
            lm_loss += a * self.cfg.moe_aux_loss_coef;
        }
        let (diffusion_loss, image_diffusion) = diffusion.unzip();
        let loss = match &diffusion_loss {
            Some(d) => &lm_loss + d * self.cfg.diffusion_lambda,
            None => lm_loss.shallow_clone(),
        };
        let per_modality_sum = Tensor::zeros([Modality::COUNT as i64], (Kind::Float, weighted.device())).index_add(
            0,
            &p.target_modality,
            &weighted.detach(),
        );
        LossOutput { loss, per_modality_sum, token_loss: weighted.detach(), lm_loss, diffusion_loss, image_diffusion }
    }
}

// ---------------------------------------------------------------------------------------
// Incremental decoding with a key/value cache (sampling)
// ---------------------------------------------------------------------------------------

/// Keys and values of every layer for one sequence being generated (batch 1), so each new
/// token costs one row of work per layer instead of a forward over the whole prefix.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: `[1, H, L, hd]` keys (RoPE applied) and values, compute precision.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig) -> Self {
        KvCache { layers: (0..cfg.n_layers).map(|_| None).collect(), len: 0 }
    }

    /// Tokens whose keys and values are cached (= the next token's absolute position).
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The layout of one incremental forward: the new tokens' route (host-computed, like
/// `Prepared`), RoPE tables at their absolute positions, and the attention mask over
/// cached + new keys.
#[derive(Debug)]
struct Step {
    route: Route,
    /// `[T]` int64 ids, layout order.
    tokens: Tensor,
    /// `[1, 1, T, hd/2]`.
    cos: Tensor,
    sin: Tensor,
    /// `[1, 1, T, L+T]` bool when the new tokens follow cached ones and are several.
    mask: Option<Tensor>,
    /// Plain causal attention (prefill into an empty cache).
    causal: bool,
}

impl Step {
    fn new(cfg: &ModelConfig, tokens: &[u32], modality: &[u8], start: i64, device: Device) -> Result<Self, TrainError> {
        let n = tokens.len();
        if n == 0 || modality.len() != n {
            return Err(TrainError::Batch(format!(
                "incremental forward needs one modality per token and at least one token (got {n} tokens, {} tags)",
                modality.len()
            )));
        }
        for (i, (&x, &m)) in tokens.iter().zip(modality).enumerate() {
            if i64::from(x) >= cfg.vocab_size {
                return Err(TrainError::Batch(format!(
                    "token id {x} at position {} is outside the model vocabulary ({})",
                    start + i as i64,
                    cfg.vocab_size
                )));
            }
            if usize::from(m) >= Modality::COUNT {
                return Err(TrainError::Batch(format!("modality tag {m} at position {} is unknown", start + i as i64)));
            }
        }
        let t = n as i64;
        let (route, order) = if cfg.towers() == 1 {
            (Route::single(t), (0..n).collect::<Vec<_>>())
        } else {
            let (route, perm, _) = Route::sorted(modality, device, cfg.grouped_mm);
            (route, perm)
        };
        let ids: Vec<i64> = order.iter().map(|&i| i64::from(tokens[i])).collect();
        let pos: Vec<f32> = (0..t).map(|i| (start + i) as f32).collect();
        let (cos, sin) = rope_tables(cfg, &pos, 1, t, device);
        // New query i sees every cached key and new keys 0..=i.
        let mask = (start > 0 && t > 1)
            .then(|| Tensor::ones([t, start + t], (Kind::Bool, device)).tril(start).view([1, 1, t, start + t]));
        Ok(Step {
            route,
            tokens: Tensor::from_slice(&ids).to_device(device),
            cos,
            sin,
            mask,
            causal: start == 0 && t > 1,
        })
    }
}

impl Block {
    /// [`Block::forward`] for new tokens of one cached sequence.
    fn forward_cached(&self, x: &Tensor, s: &Step, kv: &mut Option<(Tensor, Tensor)>, ck: Kind) -> Tensor {
        let (an, fnorm) = (&self.attn_norm, &self.ffn_norm);
        let (attn_pre, attn_post, ffn_pre, ffn_post) = match self.placement {
            NormPlacement::Pre => (Some(an), None, Some(fnorm), None),
            NormPlacement::Swin => (None, Some(an), None, Some(fnorm)),
        };
        let a = self.attn.forward_cached(x, s, kv, ck, attn_pre, attn_post);
        let h = x + a.to_kind(Kind::Float);
        let f = match &self.ffn {
            Ffn::SwiGlu(f) => f.forward(&s.route, &h, ck, ffn_pre, ffn_post),
            Ffn::Moe(m) => {
                // Token choice only (`Model::check_decodable`): each token picks its experts
                // from its own scores, exactly as in training.
                let hn = ffn_pre.map_or_else(|| h.shallow_clone(), |n| n.forward_single(&h));
                let (y, _) = m.forward(&hn, ck);
                ffn_post.map_or(y.shallow_clone(), |n| n.forward_single(&y))
            }
        };
        &h + f.to_kind(Kind::Float)
    }
}

impl Model {
    /// Errors for a model whose routing at generation time cannot be the routing it was trained
    /// with: an expert-choice MoE. Its experts each took their top `capacity · N / E` tokens
    /// of a whole training batch (a non-causal choice across sequences and positions); one
    /// decoded token, or one prompt plus image, would be ranked against a handful of tokens
    /// instead (a single token becomes every expert's top choice and goes to all of them).
    /// Token-choice MoE, dense and MoT route each token by its own input and decode exactly as
    /// they train.
    pub fn check_decodable(&self) -> Result<(), TrainError> {
        if self.cfg.arch == Arch::Moe && self.cfg.moe_routing == MoeRouting::ExpertChoice {
            return Err(TrainError::Config {
                path: "model.moe_routing".into(),
                msg: "this MoE was trained with expert-choice routing, where each expert picks its top tokens \
                      among a whole training batch (non-causal); generating one token at a time cannot route as \
                      training did (one token would go to every expert), so sampling is refused. Train the MoE \
                      with model.moe_routing = \"token_choice\" to sample from it"
                    .into(),
            });
        }
        Ok(())
    }

    /// Runs `tokens` (global ids, with each token's input modality) as the continuation of
    /// the sequence in `cache`: the first call prefills a prompt in one pass, later calls
    /// usually add one token. Returns fp32 logits `[T, V]` in sequence order and appends the
    /// tokens' keys and values to `cache`. Batch 1, no gradients.
    pub fn forward_cached(&self, tokens: &[u32], modality: &[u8], cache: &mut KvCache) -> Result<Tensor, TrainError> {
        self.check_decodable()?;
        if cache.layers.len() != self.layers.len() {
            return Err(TrainError::Batch(format!(
                "KV cache has {} layers, the model {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        let s = Step::new(&self.cfg, tokens, modality, cache.len, self.embed.device())?;
        let logits = tch::no_grad(|| {
            let mut x = Tensor::embedding(&self.embed, &s.tokens, -1, false, false);
            for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
                x = layer.forward_cached(&x, &s, kv, self.compute_kind);
            }
            let logits =
                if self.lm_head.0.len() == 1 { self.head(0, &x) } else { s.route.map(&x, |m, xs| self.head(m, xs)) };
            s.route.to_seq(&logits)
        });
        cache.len += tokens.len() as i64;
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{BatchSource, SyntheticSource};
    use motley_shards::Latents;

    fn tiny(arch: Arch) -> ModelConfig {
        ModelConfig {
            arch,
            vocab_size: 0,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            ffn_multiple_of: 16,
            ..ModelConfig::default()
        }
    }

    fn batch(vocab: &mut i64) -> Batch {
        tch::set_num_threads(1);
        let mut src = SyntheticSource::new(7, 2, 48);
        *vocab = i64::from(src.vocab().total_size);
        src.next_batch().expect("synthetic batch")
    }

    fn grads(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(n, t)| (n, t.grad())).collect()
    }

    fn run(cfg: &ModelConfig, b: &Batch, routing: Routing) -> (Tensor, Tensor, Vec<(String, Tensor)>) {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new_seeded(&vs.root(), cfg, 3).expect("model");
        let mut p = Prepared::new(cfg, b, routing, Device::Cpu).expect("prepare");
        // No-op without latent patches; with them, the same draws for both routings.
        let sched = crate::diffusion::Schedule::cosine(cfg.diffusion_steps as usize);
        let policy = crate::diffusion::NoisePolicy { caption_fraction: 0.2, caption_max_t: 500 };
        crate::diffusion::noise_prepared(&mut p, &sched, policy, (1, 1), &b.row_ids, 0);
        let logits = p.route.to_seq(&model.logits(&p));
        let out = model.loss(&p);
        out.loss.backward();
        let mut tok = p.route.to_seq(&out.token_loss);
        if let Some(d) = out.image_diffusion {
            // Per-image diffusion losses ride along with the token losses.
            tok = Tensor::cat(&[tok, d], 0);
        }
        (logits.detach(), tok, grads(&vs))
    }

    /// A batch from the real loader over a synthetic corpus whose images are latent patches.
    fn latent_batch(vocab: &mut i64, dim: u32) -> Batch {
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().expect("tempdir");
        crate::loader::write_synthetic_corpus_latent(dir.path(), 40, 5, dim).expect("corpus");
        let data = crate::config::DataConfig {
            paths: vec![dir.path().to_path_buf()],
            seq_len: 64,
            batch_size: 2,
            eval_fraction: 0.0,
            prefetch: 0,
            ..crate::config::DataConfig::default()
        };
        let mut src = crate::loader::ShardSource::open(&data, 1, motley_shards::Split::Train, 0, 1).expect("open");
        *vocab = i64::from(src.vocab().total_size);
        src.next_batch().expect("latent batch")
    }

    #[test]
    fn attention_mask_hand_built_cases() {
        // Row: doc 0 = bos, text, boi, 3 patches, eoi, text; doc 1 = bos, text.
        let ids = [40u32, 1, 42, 46, 46, 46, 43, 2, 40, 3];
        let modality = [0u8, 0, 0, 1, 1, 1, 0, 0, 0, 0];
        let segs = [0u32, 1, 2, 2, 2, 2, 2, 3, 4, 5];
        let docs = [0u32, 0, 0, 0, 0, 0, 0, 0, 1, 1];
        let b = Batch {
            batch_size: 1,
            seq_len: 10,
            inputs: ids.to_vec(),
            targets: ids[1..].iter().copied().chain([41]).collect(),
            modality: modality.to_vec(),
            target_modality: modality[1..].iter().copied().chain([0]).collect(),
            positions: vec![0, 1, 2, 3, 4, 5, 6, 7, 0, 1],
            doc_ids: docs.to_vec(),
            segment_ids: segs.to_vec(),
            loss_mask: vec![1, 1, 0, 0, 0, 1, 1, 1, 1, 1],
            latents: Latents { dim: 2, data: vec![half::f16::ONE; 6], positions: vec![3, 4, 5] },
            ..Batch::default()
        };
        let cfg = ModelConfig { vocab_size: 64, latent_dim: 2, ..tiny(Arch::Mot) };
        for routing in [Routing::Sorted, Routing::GatherScatter] {
            let p = Prepared::new(&cfg, &b, routing, Device::Cpu).expect("prepare");
            let m = p.mask.as_ref().expect("latents need a mask").get(0).get(0);
            let at = |i: i64, j: i64| m.int64_value(&[i, j]) != 0;
            // Causal text.
            assert!(at(1, 0) && at(1, 1) && !at(0, 1) && !at(6, 7) && at(7, 6));
            // Bidirectional among one image's patches, in both directions.
            assert!(at(3, 5) && at(5, 3) && at(4, 3) && at(3, 4));
            // The image's markers stay causal: boi does not see the patches, the patches do not see eoi.
            assert!(!at(2, 3) && !at(5, 6) && at(6, 3));
            // Text after the image sees it (the noised image conditions it), text before does not.
            assert!(at(7, 3) && at(7, 5) && !at(1, 3));
            // Never across documents, not even from a later document to the image.
            assert!(!at(8, 7) && !at(8, 3) && !at(9, 5) && at(9, 8));
            let lat = p.latent.as_ref().expect("latent inputs");
            assert_eq!((lat.n_images(), lat.followed_by_text.clone()), (1, vec![true]));
        }
        // Two images in one document are bidirectional within each, causal between them.
        let mut two = b.clone();
        two.segment_ids = vec![0, 1, 2, 2, 3, 3, 3, 4, 5, 6];
        let p = Prepared::new(&cfg, &two, Routing::Sorted, Device::Cpu).expect("prepare");
        let m = p.mask.as_ref().expect("mask").get(0).get(0);
        let at = |i: i64, j: i64| m.int64_value(&[i, j]) != 0;
        assert!(at(4, 5) && at(5, 4) && !at(3, 4) && at(4, 3));
        assert_eq!(p.latent.as_ref().map(LatentInputs::n_images), Some(2));
        // A model without a latent head refuses latent patches instead of ignoring them.
        let plain = ModelConfig { vocab_size: 64, ..tiny(Arch::Mot) };
        assert!(Prepared::new(&plain, &b, Routing::Sorted, Device::Cpu).is_err());
    }

    #[test]
    fn image_patches_see_each_other_and_text_before_does_not_see_them() {
        let mut v = 0;
        let b = latent_batch(&mut v, 6);
        let cfg = ModelConfig { vocab_size: v, latent_dim: 6, ..tiny(Arch::Mot) };
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new_seeded(&vs.root(), &cfg, 4).expect("model");
        let eval = |b: &Batch| {
            let p = Prepared::new(&cfg, b, Routing::Sorted, Device::Cpu).expect("prepare");
            (p.route.to_seq(&model.logits(&p)), model.predict_noise(&p))
        };
        let (l1, e1) = eval(&b);
        // Change the last patch of the first image: its first patch's prediction changes
        // (bidirectional), the logits before the image do not (causal).
        let dim = b.latents.dim;
        let first = b.latents.positions[0] as usize;
        let last = (1..b.latents.positions.len())
            .take_while(|&k| b.segment_ids[b.latents.positions[k] as usize] == b.segment_ids[first])
            .last()
            .expect("an image of several patches");
        let mut c = b.clone();
        for x in &mut c.latents.data[last * dim..(last + 1) * dim] {
            *x = half::f16::from_f32(x.to_f32() + 1.0);
        }
        let (l2, e2) = eval(&c);
        assert!(!e1.get(0).allclose(&e2.get(0), 1e-6, 1e-6, false), "first patch must see the last");
        let before = first as i64;
        assert!(l1.narrow(0, 0, before).allclose(&l2.narrow(0, 0, before), 1e-6, 1e-7, false));
    }

    #[test]
    fn transfusion_loss_runs_and_backprops() {
        let mut v = 0;
        let b = latent_batch(&mut v, 6);
        assert!(!b.latents.positions.is_empty());
        for arch in [Arch::Mot, Arch::Dense] {
            let cfg = ModelConfig { vocab_size: v, latent_dim: 6, ..tiny(arch) };
            let vs = nn::VarStore::new(Device::Cpu);
            let model = Model::new_seeded(&vs.root(), &cfg, 3).expect("model");
            let mut p = Prepared::new(&cfg, &b, Routing::Sorted, Device::Cpu).expect("prepare");
            let sched = crate::diffusion::Schedule::cosine(1000);
            let policy = crate::diffusion::NoisePolicy { caption_fraction: 0.2, caption_max_t: 500 };
            crate::diffusion::noise_prepared(&mut p, &sched, policy, (0, 1), &b.row_ids, 0);
            let out = model.loss(&p);
            let d = f64::try_from(out.diffusion_loss.as_ref().expect("diffusion loss")).expect("scalar");
            let lm = f64::try_from(&out.lm_loss).expect("scalar");
            let total = f64::try_from(&out.loss).expect("scalar");
            assert!(d.is_finite() && d > 0.0 && lm.is_finite());
            assert!((total - (lm + 5.0 * d)).abs() < 1e-4, "{total} != {lm} + 5 * {d}");
            let n_img = p.latent.as_ref().map_or(0, LatentInputs::n_images) as i64;
            assert_eq!(out.image_diffusion.as_ref().map(|t| t.size()), Some(vec![n_img]));
            out.loss.backward();
            let vars = vs.variables();
            for name in ["latent_in.weight", "latent_out.weight", "time_embed.fc1.weight", "time_embed.fc2.weight"] {
                let g = vars.get(name).unwrap_or_else(|| panic!("missing {name}")).grad();
                assert!(g.defined() && f64::try_from(g.abs().sum(Kind::Double)).unwrap_or(0.0) > 0.0, "{name}");
            }
        }
    }

    #[test]
    fn sorted_routing_matches_gather_scatter_oracle_on_latent_batch() {
        let mut v = 0;
        let b = latent_batch(&mut v, 6);
        let cfg = ModelConfig { vocab_size: v, latent_dim: 6, untie_head: true, ..tiny(Arch::Mot) };
        let (l1, t1, g1) = run(&cfg, &b, Routing::Sorted);
        let (l2, t2, g2) = run(&cfg, &b, Routing::GatherScatter);
        assert!(l1.allclose(&l2, 1e-5, 1e-6, false), "logits differ");
        assert!(t1.allclose(&t2, 1e-5, 1e-6, false), "token / diffusion losses differ");
        for ((n1, a), (_, b)) in g1.iter().zip(&g2) {
            assert_eq!(a.defined(), b.defined(), "{n1}: gradient presence differs");
            if a.defined() {
                assert!(a.allclose(b, 1e-4, 1e-6, false), "{n1}: gradients differ");
            }
        }
    }

    #[test]
    fn sorted_routing_matches_gather_scatter_oracle() {
        // The last case runs the sorted towers as one grouped GEMM per projection.
        for (untie, qk, placement, grouped_mm) in [
            (false, true, NormPlacement::Pre, false),
            (true, false, NormPlacement::Swin, false),
            (false, true, NormPlacement::Pre, true),
        ] {
            let mut v = 0;
            let b = batch(&mut v);
            assert!(b.modality.contains(&1) && b.modality.contains(&2));
            let cfg = ModelConfig {
                vocab_size: v,
                untie_head: untie,
                qk_norm: qk,
                norm: placement,
                grouped_mm,
                ..tiny(Arch::Mot)
            };
            let (l1, t1, g1) = run(&cfg, &b, Routing::Sorted);
            let (l2, t2, g2) = run(&cfg, &b, Routing::GatherScatter);
            assert!(l1.allclose(&l2, 1e-5, 1e-6, false), "logits differ");
            assert!(t1.allclose(&t2, 1e-5, 1e-6, false), "token losses differ");
            assert_eq!(g1.len(), g2.len());
            for ((n1, a), (n2, b)) in g1.iter().zip(&g2) {
                assert_eq!(n1, n2);
                assert_eq!(a.defined(), b.defined(), "{n1}: gradient presence differs");
                if a.defined() {
                    assert!(a.allclose(b, 1e-4, 1e-6, false), "{n1}: gradients differ");
                }
            }
        }
    }

    #[test]
    fn grouped_mm_needs_widths_in_multiples_of_8() {
        let cfg = ModelConfig { vocab_size: 64, d_model: 20, n_heads: 2, grouped_mm: true, ..tiny(Arch::Mot) };
        let err = cfg.validate().expect_err("d_model 20");
        assert!(err.to_string().contains("multiples of 8"), "{err}");
        assert!(ModelConfig { grouped_mm: false, ..cfg }.validate().is_ok());
    }

    #[test]
    fn mot_with_identical_towers_equals_dense() {
        let mut v = 0;
        let b = batch(&mut v);
        let dense_cfg = ModelConfig { vocab_size: v, ..tiny(Arch::Dense) };
        let mot_cfg = ModelConfig { vocab_size: v, untie_head: true, ..tiny(Arch::Mot) };
        let dense_vs = nn::VarStore::new(Device::Cpu);
        let dense = Model::new_seeded(&dense_vs.root(), &dense_cfg, 1).expect("dense");
        let mot_vs = nn::VarStore::new(Device::Cpu);
        let mot = Model::new_seeded(&mot_vs.root(), &mot_cfg, 1).expect("mot");
        // Copy each dense weight into every tower: `x.text.weight` <- `x.weight`.
        let dense_vars: std::collections::BTreeMap<String, Tensor> = public_parameters(&dense_vs).into_iter().collect();
        tch::no_grad(|| {
            for (name, mut t) in public_parameters(&mot_vs) {
                let shared = ["text", "image", "speech"]
                    .iter()
                    .fold(name.clone(), |n, m| n.replace(&format!(".{m}.weight"), ".weight"));
                let src = dense_vars.get(&shared).unwrap_or_else(|| panic!("no dense twin for {name}"));
                t.copy_(src);
            }
        });
        let pd = Prepared::new(&dense_cfg, &b, Routing::Sorted, Device::Cpu).expect("prepare");
        let pm = Prepared::new(&mot_cfg, &b, Routing::Sorted, Device::Cpu).expect("prepare");
        let ld = pd.route.to_seq(&dense.logits(&pd));
        let lm = pm.route.to_seq(&mot.logits(&pm));
        assert!(ld.allclose(&lm, 1e-5, 1e-6, false));
        let _ = dense.loss(&pd);
    }

    #[test]
    fn parameter_names_are_self_describing() {
        let cfg = ModelConfig { vocab_size: 64, untie_head: true, ..tiny(Arch::Mot) };
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = Model::new(&vs.root(), &cfg).expect("model");
        let names: std::collections::BTreeMap<String, Tensor> = public_parameters(&vs).into_iter().collect();
        for n in [
            "embed.weight",
            "layers.1.attn.q_proj.image.weight",
            "layers.0.attn.k_norm.speech.weight",
            "layers.0.ffn.down_proj.text.weight",
            "layers.1.ffn_norm.image.weight",
            "norm.speech.weight",
            "lm_head.text.weight",
        ] {
            assert!(names.contains_key(n), "missing {n}");
        }
        let (hd, d) = (cfg.head_dim(), cfg.d_model);
        assert_eq!(names["layers.0.attn.k_norm.speech.weight"].size(), [hd]);
        assert_eq!(names["layers.1.attn.v_proj.text.weight"].size(), [d, d]);
        assert_eq!(names["layers.1.ffn.up_proj.image.weight"].size(), [cfg.ffn_dim(), d]);
        let total: i64 = names.values().map(|t| t.numel() as i64).sum();
        assert_eq!(total, cfg.param_count());
        // 3 towers x (q, k, v, o, gate, up, down, attn_norm, ffn_norm, q_norm, k_norm) x 2 layers,
        // + embed, 3 final norms, 3 heads.
        assert_eq!(names.len(), 3 * 11 * 2 + 1 + 3 + 3);
        let moe = ModelConfig { vocab_size: 64, ..tiny(Arch::Moe) };
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = Model::new(&vs.root(), &moe).expect("moe");
        let names: std::collections::BTreeMap<String, Tensor> = public_parameters(&vs).into_iter().collect();
        assert!(names.contains_key("layers.0.ffn.experts.3.up_proj.weight"));
        assert!(names.contains_key("layers.0.attn.q_proj.weight"));
        let total: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(total, moe.param_count());
        let latent = ModelConfig { vocab_size: 64, latent_dim: 6, ..tiny(Arch::Mot) };
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = Model::new(&vs.root(), &latent).expect("latent");
        for n in ["latent_in.weight", "latent_out.weight", "time_embed.fc1.weight", "time_embed.fc2.weight"] {
            assert!(vs.variables().contains_key(n), "missing {n}");
        }
        let total: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(total, latent.param_count());
    }

    #[test]
    fn stacked_sites_present_views_that_share_their_memory() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        // Draws from torch's global generator: under the lock seeded initializations hold.
        let site = {
            let _guard = SEEDED_INIT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Stacked::new(&(&root / "layers" / 0 / "attn"), &["q_proj", "k_proj"], 3, &[4, 2], Some(1.0))
        };
        let vars = vs.variables();
        let stored = &vars["layers.0.attn.q_proj+k_proj.stacked"];
        assert_eq!(stored.size(), [3, 8, 2]);
        let views = public_views("layers.0.attn.q_proj+k_proj.stacked", stored);
        let names: Vec<&str> = views.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "layers.0.attn.q_proj.text.weight",
                "layers.0.attn.k_proj.text.weight",
                "layers.0.attn.q_proj.image.weight",
                "layers.0.attn.k_proj.image.weight",
                "layers.0.attn.q_proj.speech.weight",
                "layers.0.attn.k_proj.speech.weight",
            ]
        );
        // Tower 1's k_proj is rows 4..8 of tower 1; writing the view writes the leaf.
        let (_, mut k_image) = views.into_iter().nth(3).expect("view");
        assert_eq!(k_image.size(), [4, 2]);
        let _ = tch::no_grad(|| k_image.fill_(7.0));
        assert_eq!(f64::try_from(site.weight.get(1).narrow(0, 4, 4).mean(Kind::Float)).ok(), Some(7.0));
        assert_ne!(f64::try_from(site.weight.get(1).narrow(0, 0, 4).mean(Kind::Float)).ok(), Some(7.0));
        // One tower: no modality in the name; plain variables pass through.
        let one = Tensor::zeros([1, 5], (Kind::Float, Device::Cpu));
        let views = public_views("norm_a.stacked", &one);
        assert_eq!(views.len(), 1);
        assert_eq!((views[0].0.as_str(), views[0].1.size()), ("norm_a.weight", vec![5]));
        assert_eq!(public_views("embed.weight", &one)[0].0, "embed.weight");
    }

    #[test]
    fn moe_both_routings_run_and_backprop() {
        let mut v = 0;
        let b = batch(&mut v);
        for routing in [MoeRouting::ExpertChoice, MoeRouting::TokenChoice] {
            let cfg = ModelConfig { vocab_size: v, moe_routing: routing, moe_top_k: 2, ..tiny(Arch::Moe) };
            let (_, t, g) = run(&cfg, &b, Routing::Sorted);
            assert!(f64::try_from(t.sum(Kind::Float)).map(f64::is_finite).unwrap_or(false));
            let router = g.iter().find(|(n, _)| n == "layers.0.ffn.router.weight").map(|(_, t)| t.defined());
            assert_eq!(router, Some(true), "router gets a gradient");
        }
    }

    /// The router must learn from the LM loss itself, not only from the balance loss: with
    /// the aux loss off, its gradient is non-zero for top-1 and top-2 token choice and for
    /// expert choice (renormalized top-1 gates are all exactly 1 and would give zero).
    #[test]
    fn moe_router_gets_gradient_from_the_lm_loss() {
        let mut v = 0;
        let b = batch(&mut v);
        for (routing, k) in [(MoeRouting::TokenChoice, 1), (MoeRouting::TokenChoice, 2), (MoeRouting::ExpertChoice, 1)]
        {
            let cfg = ModelConfig {
                vocab_size: v,
                moe_routing: routing,
                moe_top_k: k,
                moe_aux_loss_coef: 0.0,
                ..tiny(Arch::Moe)
            };
            let (_, _, g) = run(&cfg, &b, Routing::Sorted);
            for layer in 0..cfg.n_layers {
                let name = format!("layers.{layer}.ffn.router.weight");
                let grad = g.iter().find(|(n, _)| *n == name).map(|(_, t)| t).expect("router weight");
                assert!(grad.defined(), "{routing:?} k={k}: {name} has no gradient");
                let mean_abs = |t: &Tensor| f64::try_from(t.abs().mean(Kind::Double)).expect("mean");
                // Compared with the experts' gradients of the same layer: gates that are
                // constant in the router's scores leave only rounding noise (~3e-8 of it; ~0.5 here).
                let prefix = format!("layers.{layer}.ffn.experts.");
                let experts: Vec<f64> =
                    g.iter().filter(|(n, t)| n.starts_with(&prefix) && t.defined()).map(|(_, t)| mean_abs(t)).collect();
                let expert = experts.iter().sum::<f64>() / experts.len().max(1) as f64;
                let ratio = mean_abs(grad) / expert;
                assert!(
                    ratio > 1e-3,
                    "{routing:?} k={k}: {name} gets (almost) no gradient from the LM loss: {ratio:e}"
                );
            }
        }
    }

    #[test]
    fn expert_choice_moe_refuses_to_decode_token_choice_decodes_as_it_trains() {
        let (b, v) = mixed_sequence();
        let expert = ModelConfig { vocab_size: v, ..tiny(Arch::Moe) };
        assert_eq!(expert.moe_routing, MoeRouting::ExpertChoice);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new_seeded(&vs.root(), &expert, 2).expect("model");
        let mut cache = KvCache::new(&expert);
        let err = model.forward_cached(&b.inputs[..4], &b.modality[..4], &mut cache).expect_err("expert choice");
        assert!(err.to_string().contains("token_choice"), "{err}");
        assert!(cache.is_empty());
        // Token choice: prefill + one token at a time gives the full forward's logits.
        let cfg = ModelConfig { vocab_size: v, moe_routing: MoeRouting::TokenChoice, moe_top_k: 1, ..tiny(Arch::Moe) };
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new_seeded(&vs.root(), &cfg, 2).expect("model");
        let p = Prepared::new(&cfg, &b, Routing::Sorted, Device::Cpu).expect("prepare");
        let full = p.route.to_seq(&model.logits(&p)).detach();
        let mut cache = KvCache::new(&cfg);
        let mut parts = vec![model.forward_cached(&b.inputs[..6], &b.modality[..6], &mut cache).expect("prefill")];
        for i in 6..b.seq_len {
            parts.push(model.forward_cached(&b.inputs[i..=i], &b.modality[i..=i], &mut cache).expect("step"));
        }
        let cached = Tensor::cat(&parts, 0);
        let diff = f64::try_from((&cached - &full).abs().max()).expect("max");
        assert!(cached.allclose(&full, 1e-4, 1e-5, false), "token-choice MoE decoding differs: max diff {diff}");
    }

    #[test]
    fn packed_documents_do_not_attend_across_boundaries() {
        // Changing the first document must not change the second document's logits.
        let mut v = 0;
        let mut b = batch(&mut v);
        let cfg = ModelConfig { vocab_size: v, ..tiny(Arch::Mot) };
        let row = b.seq_len;
        let split =
            (1..row).find(|&i| b.doc_ids[i] != b.doc_ids[i - 1]).expect("synthetic rows pack several documents");
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new_seeded(&vs.root(), &cfg, 5).expect("model");
        let l1 = {
            let p = Prepared::new(&cfg, &b, Routing::Sorted, Device::Cpu).expect("prepare");
            p.route.to_seq(&model.logits(&p))
        };
        b.inputs[0] = (b.inputs[0] + 1) % v as u32;
        let l2 = {
            let p = Prepared::new(&cfg, &b, Routing::Sorted, Device::Cpu).expect("prepare");
            p.route.to_seq(&model.logits(&p))
        };
        assert!(!l1.narrow(0, 0, 1).allclose(&l2.narrow(0, 0, 1), 1e-6, 1e-6, false));
        let rest = row as i64 - split as i64;
        assert!(l1.narrow(0, split as i64, rest).allclose(&l2.narrow(0, split as i64, rest), 1e-6, 1e-7, false));
    }

    #[test]
    fn bad_token_ids_are_an_error_not_a_panic() {
        let mut v = 0;
        let mut b = batch(&mut v);
        b.inputs[3] = v as u32 + 5;
        let cfg = ModelConfig { vocab_size: v, ..tiny(Arch::Mot) };
        let err = Prepared::new(&cfg, &b, Routing::Sorted, Device::Cpu).expect_err("out-of-range id");
        assert!(err.to_string().contains("flat position 3"), "{err}");
    }

    /// BOS, text, BOI, image codes, EOI, BOSP, speech units, EOSP, text, EOS (one document).
    fn mixed_sequence() -> (Batch, i64) {
        tch::set_num_threads(1);
        let vocab = motley_shards::Vocab::build(40, 16, 12, None);
        let sp = |n: &str| vocab.special(n).expect("special");
        let img = vocab.modality(Modality::Image).expect("image").offset;
        let sph = vocab.modality(Modality::Speech).expect("speech").offset;
        let mut ids = vec![sp("bos"), 3, 17, 5, sp("boi")];
        ids.extend((0..9).map(|i| img + (i * 5) % 16));
        ids.extend([sp("eoi"), 8, sp("bosp")]);
        ids.extend((0..7).map(|i| sph + (i * 3) % 12));
        ids.extend([sp("eosp"), 21, 2, sp("eos")]);
        let t = ids.len() - 1;
        let modality: Vec<u8> = ids.iter().map(|&i| vocab.modality_of(i) as u8).collect();
        let b = Batch {
            batch_size: 1,
            seq_len: t,
            inputs: ids[..t].to_vec(),
            targets: ids[1..].to_vec(),
            modality: modality[..t].to_vec(),
            target_modality: modality[1..].to_vec(),
            positions: (0..t as u32).collect(),
            doc_ids: vec![0; t],
            segment_ids: vec![0; t],
            loss_mask: vec![1; t],
            ..Batch::default()
        };
        (b, i64::from(vocab.total_size))
    }

    #[test]
    fn cached_decoding_matches_full_forward() {
        let (b, v) = mixed_sequence();
        let t = b.seq_len;
        for cfg in [
            ModelConfig { vocab_size: v, ..tiny(Arch::Dense) },
            ModelConfig { vocab_size: v, ..tiny(Arch::Mot) },
            ModelConfig { vocab_size: v, untie_head: true, norm: NormPlacement::Swin, ..tiny(Arch::Mot) },
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let model = Model::new_seeded(&vs.root(), &cfg, 11).expect("model");
            let p = Prepared::new(&cfg, &b, Routing::Sorted, Device::Cpu).expect("prepare");
            let full = p.route.to_seq(&model.logits(&p)).detach();
            // Prefill a prompt that ends inside the image, then one token at a time, with one
            // two-token step (a multi-token step over a non-empty cache needs the offset mask).
            let mut cache = KvCache::new(&cfg);
            let split = 8;
            let mut parts =
                vec![model.forward_cached(&b.inputs[..split], &b.modality[..split], &mut cache).expect("prefill")];
            let mut i = split;
            while i < t {
                let n = if i == split + 3 { 2 } else { 1 };
                parts.push(model.forward_cached(&b.inputs[i..i + n], &b.modality[i..i + n], &mut cache).expect("step"));
                i += n;
            }
            assert_eq!(cache.len(), t as i64);
            let cached = Tensor::cat(&parts, 0);
            assert_eq!(cached.size(), full.size());
            let diff = f64::try_from((&cached - &full).abs().max()).expect("max");
            assert!(
                cached.allclose(&full, 1e-4, 1e-5, false),
                "{} untie={}: max diff {diff}",
                cfg.arch,
                cfg.untie_head
            );
        }
    }

    #[test]
    fn cached_forward_rejects_bad_ids() {
        let cfg = ModelConfig { vocab_size: 64, ..tiny(Arch::Mot) };
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new_seeded(&vs.root(), &cfg, 1).expect("model");
        let mut cache = KvCache::new(&cfg);
        let err = model.forward_cached(&[1, 64], &[0, 0], &mut cache).expect_err("id outside vocab");
        assert!(err.to_string().contains("position 1"), "{err}");
        assert!(model.forward_cached(&[1], &[7], &mut cache).is_err());
        assert!(cache.is_empty());
    }
}
