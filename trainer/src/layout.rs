//! The per-batch layout: everything a step derives from a `Batch` before the model runs —
//! which tower each token's row belongs to and the order rows run in (routing), the attention
//! mask, RoPE tables, targets and loss weights, the latent patches of the Transfusion setting
//! and their training noise — and the same for the new tokens of an incremental (sampling)
//! forward. Built on the host once per batch; layers never look at token values, so no
//! device → host sync happens inside the model.

use motley_shards::{Batch, Modality};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::diffusion::{NoisePolicy, Schedule, noise_rng, normal_draws, q_sample};
use crate::error::TrainError;
use crate::model::ModelConfig;
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
    pub(crate) n: i64,
    pub(crate) kind: RouteKind,
}

#[derive(Debug)]
pub(crate) enum RouteKind {
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
    /// The same layout sharing its index tensors (what a recomputed block needs to own).
    pub(crate) fn shallow_clone(&self) -> Route {
        let kind = match &self.kind {
            RouteKind::Single => RouteKind::Single,
            RouteKind::Sorted { perm, inv, spans, ends } => RouteKind::Sorted {
                perm: perm.shallow_clone(),
                inv: inv.shallow_clone(),
                spans: *spans,
                ends: ends.as_ref().map(Tensor::shallow_clone),
            },
            RouteKind::Scatter { idx } => {
                RouteKind::Scatter { idx: idx.iter().map(|t| t.as_ref().map(Tensor::shallow_clone)).collect() }
            }
        };
        Route { n: self.n, kind }
    }

    /// `n` tokens all in one tower, in sequence order.
    pub(crate) fn single(n: i64) -> Route {
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
    pub(crate) fn active(&self) -> Vec<usize> {
        match &self.kind {
            RouteKind::Single => vec![0],
            RouteKind::Sorted { spans, .. } => (0..Modality::COUNT).filter(|&m| spans[m].1 > 0).collect(),
            RouteKind::Scatter { idx } => (0..idx.len()).filter(|&m| idx[m].is_some()).collect(),
        }
    }

    /// Rows tower `m` holds.
    pub(crate) fn rows(&self, m: usize) -> i64 {
        match &self.kind {
            RouteKind::Single => self.n,
            RouteKind::Sorted { spans, .. } => spans[m].1,
            RouteKind::Scatter { idx } => idx[m].as_ref().map_or(0, |i| i.size()[0]),
        }
    }

    /// `x` (layout order) cut into each active tower's rows, in `active()` order. Sorted: one
    /// `split_with_sizes`, whose backward is a single cat (slicing per tower would zero-fill a
    /// full-size gradient for every tower). Oracle: a gather per tower.
    pub(crate) fn split(&self, x: &Tensor) -> Vec<(usize, Tensor)> {
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
    pub(crate) fn combine(&self, parts: Vec<(usize, Tensor)>) -> Tensor {
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
    pub(crate) fn matmul(&self, x: &Tensor, w: &Tensor) -> Tensor {
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
    pub(crate) fn per_row(&self, w: &Tensor) -> Tensor {
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
pub(crate) fn scatter_rows(x: &Tensor, index: &Tensor) -> Tensor {
    let mut y = x.empty_like();
    let _ = y.index_copy_(0, index, x);
    y
}

impl Route {
    /// Stable counting sort of the tokens by `modality` (host side): the sorted route, its
    /// permutation (`perm[row]` = sequence index of layout row) and inverse (`inv[i]` = layout row).
    pub(crate) fn sorted(modality: &[u8], device: Device, grouped: bool) -> (Route, Vec<usize>, Vec<i64>) {
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
pub(crate) fn rope_tables(cfg: &ModelConfig, positions: &[f32], b: i64, t: i64, device: Device) -> (Tensor, Tensor) {
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
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// `[B, 1, T, T]` bool: causal and inside one document, bidirectional among the patches of
    /// one latent image; None when plain causal suffices.
    pub(crate) mask: Option<Tensor>,
    /// Latent image patches (Transfusion setting); None when the batch has none.
    pub latent: Option<LatentInputs>,
}

/// The continuous image patches of a prepared batch and their noised versions.
#[derive(Debug)]
pub struct LatentInputs {
    pub dim: usize,
    /// `[P]` layout rows of the patch positions (patch order of `Batch::latents`).
    pub(crate) rows: Tensor,
    /// `[P, dim]` fp32 clean latents x_0 (the batch's latents times `latent_factor()`).
    pub x0: Tensor,
    /// Image index of each patch: an image is one latent segment within one row.
    pub image_of_patch: Vec<usize>,
    /// `[P]` int64 on the device, the same.
    pub(crate) image_index: Tensor,
    /// `[images]` fp32 patch count per image.
    pub(crate) image_patches: Tensor,
    /// Per image: loss-bearing tokens follow it in its document (the captioning case).
    pub followed_by_text: Vec<bool>,
    /// Per image: its row of the batch (training noise is drawn per row).
    pub row_of_image: Vec<usize>,
    /// Noised inputs `[P, dim]`, their timestep per image, and the true noise (training).
    pub(crate) xt: Option<Tensor>,
    pub timesteps: Vec<usize>,
    pub(crate) eps: Option<Tensor>,
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
    pub(crate) fn patch_timesteps(&self) -> Tensor {
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

/// The layout of one incremental forward: the new tokens' route (host-computed, like
/// `Prepared`), RoPE tables at their absolute positions, and the attention mask over
/// cached + new keys.
#[derive(Debug)]
pub(crate) struct Step {
    pub(crate) route: Route,
    /// `[T]` int64 ids, layout order.
    pub(crate) tokens: Tensor,
    /// `[1, 1, T, hd/2]`.
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// `[1, 1, T, L+T]` bool when the new tokens follow cached ones and are several.
    pub(crate) mask: Option<Tensor>,
    /// Plain causal attention (prefill into an empty cache).
    pub(crate) causal: bool,
}

impl Step {
    pub(crate) fn new(
        cfg: &ModelConfig,
        tokens: &[u32],
        modality: &[u8],
        start: i64,
        device: Device,
    ) -> Result<Self, TrainError> {
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

/// What attention needs of a layout, the same for a training batch and an incremental step:
/// the route, RoPE tables, the mask (None with `causal`: plain causal attention) and the row
/// shape `[batch, seq]` in sequence order.
#[derive(Debug)]
pub(crate) struct AttnCtx<'a> {
    pub(crate) route: &'a Route,
    pub(crate) cos: &'a Tensor,
    pub(crate) sin: &'a Tensor,
    pub(crate) mask: Option<&'a Tensor>,
    pub(crate) causal: bool,
    pub(crate) batch: i64,
    pub(crate) seq: i64,
}

/// An [`AttnCtx`] that owns (shallow clones of) its tensors: what a checkpointed block keeps
/// to run its forward again during backward.
#[derive(Debug)]
pub(crate) struct OwnedAttnCtx {
    route: Route,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    causal: bool,
    batch: i64,
    seq: i64,
}

impl AttnCtx<'_> {
    pub(crate) fn to_owned(&self) -> OwnedAttnCtx {
        OwnedAttnCtx {
            route: self.route.shallow_clone(),
            cos: self.cos.shallow_clone(),
            sin: self.sin.shallow_clone(),
            mask: self.mask.map(Tensor::shallow_clone),
            causal: self.causal,
            batch: self.batch,
            seq: self.seq,
        }
    }
}

impl OwnedAttnCtx {
    pub(crate) fn view(&self) -> AttnCtx<'_> {
        AttnCtx {
            route: &self.route,
            cos: &self.cos,
            sin: &self.sin,
            mask: self.mask.as_ref(),
            causal: self.causal,
            batch: self.batch,
            seq: self.seq,
        }
    }
}

impl Prepared {
    pub(crate) fn attn_ctx(&self) -> AttnCtx<'_> {
        AttnCtx {
            route: &self.route,
            cos: &self.cos,
            sin: &self.sin,
            mask: self.mask.as_ref(),
            causal: self.mask.is_none(),
            batch: self.batch_size,
            seq: self.seq_len,
        }
    }
}

impl Step {
    pub(crate) fn attn_ctx(&self) -> AttnCtx<'_> {
        AttnCtx {
            route: &self.route,
            cos: &self.cos,
            sin: &self.sin,
            mask: self.mask.as_ref(),
            causal: self.causal,
            batch: 1,
            seq: self.route.len(),
        }
    }
}

/// How a training (or evaluation) batch's latent patches are noised: the Transfusion recipe's
/// timesteps and Gaussian noise, drawn per row from the stream of `(seed, step, row)` — so an
/// image gets the same noise whichever rank, micro-batch or batch slot its row lands in.
#[derive(Debug, Clone, Copy)]
pub struct Noising<'a> {
    pub schedule: &'a Schedule,
    pub policy: NoisePolicy,
    pub seed: u64,
    pub step: u64,
    /// Stream of row `b` of a batch without global row ids: `fallback_stream + b`.
    pub fallback_stream: u64,
}

impl Prepared {
    /// The whole per-batch layout of a training or evaluation step: [`Prepared::new`], then
    /// the latent patches noised (when the batch has any and `noising` is given).
    pub fn build(
        cfg: &ModelConfig,
        batch: &Batch,
        routing: Routing,
        device: Device,
        noising: Option<&Noising<'_>>,
    ) -> Result<Self, TrainError> {
        let mut p = Prepared::new(cfg, batch, routing, device)?;
        if let Some(n) = noising {
            n.apply(&mut p, &batch.row_ids);
        }
        Ok(p)
    }
}

impl Noising<'_> {
    /// Draws a timestep per image and noise per patch and sets `p`'s noised latents. Each row's
    /// images draw from the stream of `(seed, step, row)`, where `row` is the row's global index
    /// in the loader's stream (`row_ids`; a batch without them uses `fallback_stream + row`): an
    /// image gets the same noise whichever rank, micro-batch or batch slot its row lands in, so
    /// N ranks train exactly what one process with N times the batch does. Does nothing when the
    /// batch has no latent patches.
    pub fn apply(&self, p: &mut Prepared, row_ids: &[u64]) {
        let (sched, policy, seed, step, fallback_stream) =
            (self.schedule, self.policy, self.seed, self.step, self.fallback_stream);
        let Some(lat) = p.latent.as_mut() else { return };
        let big_t = sched.steps();
        let dim = lat.dim;
        let n_patches = lat.image_of_patch.len();
        // Patches of each image, in patch order.
        let mut patches: Vec<Vec<usize>> = vec![Vec::new(); lat.n_images()];
        for (q, &i) in lat.image_of_patch.iter().enumerate() {
            patches[i].push(q);
        }
        let mut rngs: std::collections::BTreeMap<usize, ChaCha8Rng> = std::collections::BTreeMap::new();
        let mut timesteps = Vec::with_capacity(lat.n_images());
        let mut eps = vec![0f32; n_patches * dim];
        for (i, &captioned) in lat.followed_by_text.iter().enumerate() {
            let row = lat.row_of_image[i];
            let rng = rngs.entry(row).or_insert_with(|| {
                let stream = row_ids.get(row).copied().unwrap_or(fallback_stream.wrapping_add(row as u64));
                noise_rng(seed, step, stream)
            });
            // Draw both numbers for every image so the stream does not depend on the layout.
            let cap = rng.random::<f64>() < policy.caption_fraction;
            let u = rng.random::<f64>();
            let hi = if captioned && cap { policy.caption_max_t.clamp(1, big_t) } else { big_t };
            timesteps.push(((u * hi as f64) as usize).min(hi - 1));
            let draws = normal_draws(rng, patches[i].len() * dim);
            for (k, &q) in patches[i].iter().enumerate() {
                eps[q * dim..(q + 1) * dim].copy_from_slice(&draws[k * dim..(k + 1) * dim]);
            }
        }
        let ab: Vec<f32> = lat.image_of_patch.iter().map(|&i| sched.alpha_bar[timesteps[i]] as f32).collect();
        let device = lat.x0.device();
        let eps = Tensor::from_slice(&eps).view([n_patches as i64, dim as i64]).to_device(device);
        let ab = Tensor::from_slice(&ab).view([n_patches as i64, 1]).to_device(device);
        let xt = q_sample(&lat.x0, &eps, &ab);
        lat.set_noised(xt, timesteps, Some(eps));
    }
}
