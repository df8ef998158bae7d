//! The decoder-only transformer, read top to bottom: Config → Attention → FFN → Block → Model.
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
//! indices computed on the host from the `Batch`: [`crate::layout`]), so each tower runs its
//! matmuls on one contiguous slice; order is restored only around attention. The loss is
//! computed in sorted order against targets permuted the same way. `Routing::GatherScatter` is
//! the plain Algorithm-1 form (gather each modality's rows, scatter results back, per op), kept
//! as the test oracle.
//!
//! Storage: each projection or norm site keeps every tower's weights in one leaf tensor
//! ([`crate::towers`]); checkpoints see them per tower under self-describing names.
//!
//! The training forward and the cached (sampling) forward are one code path: a layer takes an
//! attention context ([`AttnCtx`], from a batch's [`Prepared`] or an incremental [`Step`]) and an
//! optional key/value cache.
//!
//! Precision: weights are fp32 masters; `compute_kind` (bf16 on CUDA) is applied by hand at
//! every matmul and attention call, norms and the loss run in fp32. tch's `autocast` only
//! offers CUDA fp16, which would need loss scaling.

use std::sync::Arc;

use motley_shards::Modality;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::error::TrainError;
use crate::fsdp::{BlockUnit, Fsdp};
use crate::layout::{AttnCtx, OwnedAttnCtx, Step};
pub use crate::layout::{LatentInputs, Prepared, Route, Routing};
use crate::ops::CheckpointFn;
use crate::towers::{Linear, RmsNorm, Stacked, TowerNorm, Towers, rms, site_weight};
pub use crate::towers::{public_parameters, public_views};

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
    /// Compute the LM head and cross-entropy this many rows at a time (one autograd op:
    /// `ops::linear_cross_entropy`), so the `[rows, vocab]` fp32 logits never exist whole
    /// (8.6 GB at 8 × 4096 rows × 65k ids); 0 = all rows at once. Same gradients either way.
    #[serde(default)]
    pub ce_chunk_rows: i64,
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
            ce_chunk_rows: 0,
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
        if self.vocab_size <= 0 {
            return Err(TrainError::Config {
                path: "model".into(),
                msg: format!("vocab_size must be > 0 (got {})", self.vocab_size),
            });
        }
        self.check_settings()
    }

    /// [`ModelConfig::validate`] but for the vocabulary, which may still come from the corpus
    /// (`vocab_size = 0`): run before anything is built from the config.
    pub fn check_settings(&self) -> Result<(), TrainError> {
        let bad = |msg: String| Err(TrainError::Config { path: "model".into(), msg });
        if self.vocab_size < 0 || self.vocab_size > i64::from(u32::MAX) {
            return bad(format!("vocab_size {} is not in [0, 2^32) (token ids are u32)", self.vocab_size));
        }
        if self.d_model <= 0 || self.n_layers <= 0 || self.n_heads <= 0 {
            return bad("d_model, n_layers and n_heads must be > 0".into());
        }
        // Far past any model that trains (a 7B has d 4096, 32 layers, F 11008), and small enough
        // that parameter counts and FLOPs stay exact in i64: a typo gets this message, not an
        // allocation failure.
        for (name, v, max) in [
            ("d_model", self.d_model, 1 << 17),
            ("n_layers", self.n_layers, 1 << 12),
            ("ffn_hidden", self.ffn_hidden, 1 << 19),
            ("ffn_multiple_of", self.ffn_multiple_of, 1 << 19),
            ("n_experts", self.n_experts, 1 << 10),
            ("latent_dim", self.latent_dim, 1 << 20),
            ("diffusion_steps", self.diffusion_steps, 1 << 20),
        ] {
            if v > max {
                return bad(format!("{name} {v} is larger than {max}"));
            }
        }
        if self.ffn_hidden < 0 || self.ffn_multiple_of < 0 || self.ce_chunk_rows < 0 {
            return bad("ffn_hidden, ffn_multiple_of and ce_chunk_rows must be >= 0 (0: derived / off)".into());
        }
        for (name, v) in [("norm_eps", self.norm_eps), ("rope_theta", self.rope_theta), ("init_std", self.init_std)] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} must be a finite number > 0 (got {v})"));
            }
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
            if !(self.moe_capacity_factor > 0.0 && self.moe_capacity_factor.is_finite()) {
                return bad("moe_capacity_factor must be finite and > 0".into());
            }
            if !(self.moe_aux_loss_coef >= 0.0 && self.moe_aux_loss_coef.is_finite()) {
                return bad("moe_aux_loss_coef must be finite and >= 0".into());
            }
        }
        if self.latent_dim < 0
            || self.diffusion_steps < 1
            || !(self.diffusion_lambda >= 0.0 && self.diffusion_lambda.is_finite())
        {
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
    /// per-tower attention norm (pre-norm or swin placement). With `kv` (incremental decoding,
    /// batch 1), the cached keys and values (`[1, H, L, hd]`, RoPE applied, compute precision)
    /// are attended to as well, and the new rows' keys and values are appended to them.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &AttnCtx<'_>,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        ck: Kind,
        pre: Option<&TowerNorm>,
        post: Option<&TowerNorm>,
    ) -> Tensor {
        let (h, hd) = (self.n_heads, self.head_dim);
        let qkv = self.project_in(ctx.route, x, ck, pre);
        // One scatter restores sequence order for q, k and v together.
        let qkv = ctx.route.to_seq(&qkv).view([ctx.batch, ctx.seq, 3, h, hd]).permute([2, 0, 3, 1, 4]);
        let qkv = qkv.unbind(0);
        let q = apply_rope(&qkv[0], ctx.cos, ctx.sin);
        let k = apply_rope(&qkv[1], ctx.cos, ctx.sin);
        let (k, v) = match kv {
            None => (k, qkv[2].shallow_clone()),
            Some(cache) => {
                let (k, v) = match cache.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2), Tensor::cat(&[&pv, &qkv[2]], 2)),
                    None => (k.contiguous(), qkv[2].contiguous()),
                };
                *cache = Some((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
        };
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, ctx.mask, 0.0, ctx.causal, None, false);
        let y = ctx.route.from_seq(&y.transpose(1, 2).reshape([ctx.route.len(), h * hd]));
        self.project_out(ctx.route, &y, ck, post)
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
    /// The same block sharing its parameters, for a checkpointed forward to own (dense and MoT
    /// blocks; an MoE block returns its aux loss beside the output, so it is not checkpointed).
    fn shallow_clone(&self) -> Option<Block> {
        let Ffn::SwiGlu(f) = &self.ffn else { return None };
        let a = &self.attn;
        Some(Block {
            attn_norm: self.attn_norm.shallow_clone(),
            attn: Attention {
                qkv_proj: a.qkv_proj.shallow_clone(),
                o_proj: a.o_proj.shallow_clone(),
                qk_norm: a.qk_norm.as_ref().map(TowerNorm::shallow_clone),
                n_heads: a.n_heads,
                head_dim: a.head_dim,
            },
            ffn_norm: self.ffn_norm.shallow_clone(),
            ffn: Ffn::SwiGlu(SwiGlu {
                gate_up_proj: f.gate_up_proj.shallow_clone(),
                down_proj: f.down_proj.shallow_clone(),
            }),
            placement: self.placement,
        })
    }

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

    /// Residual stream `x` (`[N, D]` fp32, layout order) → next residual stream, plus the MoE
    /// aux loss. `kv`: this layer's cache in incremental decoding (see [`Attention::forward`]).
    fn forward(
        &self,
        x: &Tensor,
        ctx: &AttnCtx<'_>,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        ck: Kind,
    ) -> (Tensor, Option<Tensor>) {
        let (an, fnorm) = (&self.attn_norm, &self.ffn_norm);
        let (attn_pre, attn_post, ffn_pre, ffn_post) = match self.placement {
            NormPlacement::Pre => (Some(an), None, Some(fnorm), None),
            NormPlacement::Swin => (None, Some(an), None, Some(fnorm)),
        };
        let a = self.attn.forward(x, ctx, kv, ck, attn_pre, attn_post);
        let h = x + a.to_kind(Kind::Float);
        let (f, aux) = match &self.ffn {
            Ffn::SwiGlu(f) => (f.forward(ctx.route, &h, ck, ffn_pre, ffn_post), None),
            Ffn::Moe(m) => {
                // MoE models have one tower of norms, applied to all tokens. (Decoding reaches
                // here only for token choice, `Model::check_decodable`: each token picks its
                // experts from its own scores, exactly as in training.)
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

/// A block's forward as [`crate::ops::checkpoint`] runs it: owns its (shallow-cloned) weights
/// and attention context, since autograd may run it again while the graph lives; under
/// ZeRO-3 the hooks gather and free the block's weights around each run.
struct CheckpointedBlock {
    block: Block,
    ctx: OwnedAttnCtx,
    ck: Kind,
    unit: Option<BlockUnit>,
}

impl CheckpointFn for CheckpointedBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor, String> {
        Ok(self.block.forward(x, &self.ctx.view(), None, self.ck).0)
    }

    fn before(&self, recompute: bool) -> Result<(), String> {
        self.unit.as_ref().map_or(Ok(()), |u| u.before(recompute))
    }

    fn after(&self, backward: bool) -> Result<(), String> {
        self.unit.as_ref().map_or(Ok(()), |u| u.after(backward))
    }
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
    /// Activation checkpointing of every n-th block (0: off).
    checkpoint_every: usize,
    /// ZeRO-3: the blocks' weights are gathered by this around each checkpointed run.
    fsdp: Option<Arc<Fsdp>>,
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
        Self::new_seeded_for(root, cfg, seed, root.device())
    }

    /// [`Model::new_seeded`] with the parameters created under `root` (host memory, say) but
    /// the model computing on `device`, where its weights will be moved before they are used
    /// (ZeRO-3 on a GPU: the whole model never exists on the device).
    pub fn new_seeded_for(root: &nn::Path, cfg: &ModelConfig, seed: i64, device: Device) -> Result<Self, TrainError> {
        let _guard = SEEDED_INIT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tch::manual_seed(seed);
        Model::build(root, cfg, device)
    }

    /// Creates every parameter under `root`; initialization draws from torch's generator
    /// (under the same lock, so it cannot disturb a seeded initialization running beside it),
    /// so prefer [`Model::new_seeded`] for a reproducible model.
    pub fn new(root: &nn::Path, cfg: &ModelConfig) -> Result<Self, TrainError> {
        let _guard = SEEDED_INIT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Model::build(root, cfg, root.device())
    }

    fn build(root: &nn::Path, cfg: &ModelConfig, device: Device) -> Result<Self, TrainError> {
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
        let compute_kind = if device.is_cuda() { Kind::BFloat16 } else { Kind::Float };
        if cfg.grouped_mm && cfg.towers() > 1 {
            probe_grouped_mm(cfg, device, compute_kind)?;
        }
        Ok(Model {
            cfg: cfg.clone(),
            embed,
            layers,
            final_norm,
            lm_head,
            latent,
            compute_kind,
            checkpoint_every: 0,
            fsdp: None,
        })
    }

    /// Residual stream after the last block `[N, D]` (fp32, before the final norm), layout
    /// order; plus the summed MoE aux loss if any.
    pub fn hidden(&self, p: &Prepared) -> (Tensor, Option<Tensor>) {
        let mut x = Tensor::embedding(&self.embed, &p.tokens, -1, false, false);
        if let (Some(head), Some(lat)) = (&self.latent, &p.latent) {
            x = x.index_copy(0, &lat.rows, &head.embed(lat, self.compute_kind));
        }
        let mut aux: Option<Tensor> = None;
        let ctx = p.attn_ctx();
        for (i, layer) in self.layers.iter().enumerate() {
            // Under ZeRO-3 every block runs through the node that gathers its weights, with or
            // without a graph.
            let checkpoint = self.checkpoint_every > 0 && i % self.checkpoint_every == 0 && x.requires_grad();
            if (self.fsdp.is_some() || checkpoint)
                && let Some(y) = self.checkpointed(i, layer, &x, &ctx)
            {
                x = y;
                continue;
            }
            let (y, a) = layer.forward(&x, &ctx, None, self.compute_kind);
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

    /// `layer` on `x` with activation checkpointing: nothing inside the block is kept for
    /// backward, which runs the block's forward again (`ops::checkpoint`). None for a block that
    /// cannot be checkpointed (MoE) or if the op fails (it warns once).
    ///
    /// Under ZeRO-3 a failure is recorded for the trainer ([`Fsdp::take_error`]) and the block
    /// runs with its weights gathered (kept until the step's end, so backward still finds them).
    fn checkpointed(&self, i: usize, layer: &Block, x: &Tensor, ctx: &AttnCtx<'_>) -> Option<Tensor> {
        let block = layer.shallow_clone()?;
        let unit = self.fsdp.as_ref().map(|f| BlockUnit { fsdp: Arc::clone(f), layer: i });
        let f = CheckpointedBlock { block, ctx: ctx.to_owned(), ck: self.compute_kind, unit };
        match crate::ops::checkpoint(x, Box::new(f)) {
            Ok(y) => Some(y),
            Err(e) => {
                if let Some(f) = &self.fsdp {
                    let fallback = f.gather(i + 1).and_then(|()| f.link_grads(i + 1));
                    f.fail(match fallback {
                        Ok(()) => e.to_string(),
                        Err(g) => format!("{e}; then {g}"),
                    });
                    return None;
                }
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| tracing::warn!("activation checkpointing failed, keeping activations: {e}"));
                None
            }
        }
    }

    /// ZeRO-3 ([`crate::fsdp`]): blocks gather their weights through `fsdp` around each run
    /// (every block is checkpointed); unit 0 must be gathered by the caller before a forward.
    pub fn set_fsdp(&mut self, fsdp: Option<Arc<Fsdp>>) {
        self.fsdp = fsdp;
    }

    /// Recompute every `every`-th block's activations in backward instead of keeping them
    /// (`train.activation_checkpointing`); 0 keeps all.
    pub fn set_activation_checkpointing(&mut self, every: usize) {
        self.checkpoint_every = every;
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
        let chunk = self.cfg.ce_chunk_rows;
        let ce = |m: usize, xs: &Tensor, ts: &Tensor| -> Tensor {
            if chunk > 0 {
                let ck = self.compute_kind;
                let h = self.final_norm.pick(m).forward(xs).to_kind(ck);
                let w = self.lm_head.pick(m).weight.to_kind(ck);
                // Shapes and ids were checked when the batch was laid out; if the op still fails
                // (it never has), warn once and take the unchunked path.
                match crate::ops::linear_cross_entropy(&h, &w, ts, chunk) {
                    Ok(loss) => return loss,
                    Err(e) => {
                        static WARNED: std::sync::Once = std::sync::Once::new();
                        WARNED.call_once(|| tracing::warn!("chunked cross-entropy failed, using full logits: {e}"));
                    }
                }
            }
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
                x = layer.forward(&x, &s.attn_ctx(), Some(kv), self.compute_kind).0;
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
    use motley_shards::Batch;
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

    /// Loss, per-parameter gradients and the bytes held at the peak of forward + backward,
    /// for a tiny model with a 4,096-id head (so the logits dominate) and `chunk` CE rows.
    fn ce_run(arch: Arch, untie_head: bool, chunk: i64) -> (f64, Vec<(String, Tensor)>, i64) {
        let mut v = 0;
        let b = batch(&mut v);
        let cfg = ModelConfig { vocab_size: 4096, untie_head, ce_chunk_rows: chunk, ..tiny(arch) };
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new_seeded(&vs.root(), &cfg, 5).expect("model");
        let p = Prepared::new(&cfg, &b, Routing::Sorted, Device::Cpu).expect("prepare");
        let (loss, span) = crate::ops::track_memory(|| {
            let out = model.loss(&p);
            out.loss.backward();
            f64::try_from(&out.loss).expect("scalar")
        })
        .expect("tracked");
        (loss, grads(&vs), span.peak)
    }

    /// Loss, gradients and peak bytes of forward + backward with every `every`-th block
    /// checkpointed (0: none), on a model deep and wide enough that activations dominate.
    fn ckpt_run(arch: Arch, norm: NormPlacement, every: usize) -> (f64, Vec<(String, Tensor)>, i64) {
        tch::set_num_threads(1);
        let mut src = SyntheticSource::new(9, 4, 64);
        let b = src.next_batch().expect("synthetic batch");
        let v = i64::from(src.vocab().total_size);
        let cfg = ModelConfig { vocab_size: v, d_model: 64, n_layers: 4, norm, ..tiny(arch) };
        let vs = nn::VarStore::new(Device::Cpu);
        let mut model = Model::new_seeded(&vs.root(), &cfg, 11).expect("model");
        model.set_activation_checkpointing(every);
        let p = Prepared::new(&cfg, &b, Routing::Sorted, Device::Cpu).expect("prepare");
        let (loss, span) = crate::ops::track_memory(|| {
            let out = model.loss(&p);
            out.loss.backward();
            f64::try_from(&out.loss).expect("scalar")
        })
        .expect("tracked");
        (loss, grads(&vs), span.peak)
    }

    #[test]
    fn activation_checkpointing_gives_the_same_gradients_and_keeps_less() {
        for (arch, norm) in
            [(Arch::Mot, NormPlacement::Pre), (Arch::Mot, NormPlacement::Swin), (Arch::Dense, NormPlacement::Pre)]
        {
            let (l0, g0, peak0) = ckpt_run(arch, norm, 0);
            for every in [1, 2] {
                let (l1, g1, peak1) = ckpt_run(arch, norm, every);
                assert_eq!(l0, l1, "{arch} {norm:?}: the forward is the same computation");
                for ((name, a), (_, b)) in g0.iter().zip(&g1) {
                    let scale = f64::try_from(a.abs().max()).expect("max").max(1e-12);
                    let diff = f64::try_from((a - b).abs().max()).expect("max");
                    assert!(diff <= 1e-6 * scale, "{arch} {norm:?} every {every}: {name} differs by {diff} of {scale}");
                }
                assert!(peak1 < peak0, "{arch} every {every}: peak {peak1} bytes with checkpointing, {peak0} without");
            }
        }
    }

    #[test]
    fn chunked_cross_entropy_matches_full_logits_and_holds_less() {
        let logits_bytes = 2 * 48 * 4096 * 4;
        for (arch, untie) in [(Arch::Mot, false), (Arch::Mot, true), (Arch::Dense, false)] {
            let (full, gf, peak_full) = ce_run(arch, untie, 0);
            let (chunked, gc, peak_chunked) = ce_run(arch, untie, 13); // 96 rows: 7 full chunks and 5
            assert!((full - chunked).abs() <= 1e-6 * full.abs(), "{arch} untie={untie}: {full} vs {chunked}");
            for ((name, a), (_, b)) in gf.iter().zip(&gc) {
                if !a.defined() {
                    assert!(!b.defined(), "{name}");
                    continue;
                }
                let scale = f64::try_from(a.abs().max()).expect("max").max(1e-12);
                let diff = f64::try_from((a - b).abs().max()).expect("max");
                assert!(diff <= 1e-5 * scale, "{arch} untie={untie} {name}: max diff {diff} of {scale}");
            }
            // The full path holds [rows, vocab] logits, their log-softmax and their gradient;
            // the chunked one a 13-row slice of them. (Untied heads run per tower, so there the
            // full path's logits are only one tower's rows at a time, beside three head weights.)
            let saved = if untie { 0 } else { logits_bytes };
            assert!(
                peak_chunked + saved < peak_full,
                "{arch} untie={untie}: peak {peak_chunked} chunked vs {peak_full} full bytes (logits {logits_bytes})"
            );
        }
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
        let noising = crate::layout::Noising { schedule: &sched, policy, seed: 1, step: 1, fallback_stream: 0 };
        noising.apply(&mut p, &b.row_ids);
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
            let noising = crate::layout::Noising { schedule: &sched, policy, seed: 0, step: 1, fallback_stream: 0 };
            noising.apply(&mut p, &b.row_ids);
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
