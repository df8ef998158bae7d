//! Parameter storage by tower: each projection or norm site keeps every tower's weights in
//! one leaf tensor ([`Stacked`], `[towers, Σ out, in]`), viewed per tower under
//! self-describing names for checkpoints ([`public_views`]); the final norm and LM head keep
//! one variable per tower ([`Towers`]); and the bias-free linear and RMSNorm layers.

use motley_shards::Modality;
use tch::{Kind, Tensor, nn};

use crate::layout::Route;
// ---------------------------------------------------------------------------------------
// Building blocks: towers of untied weights, norms, linears
// ---------------------------------------------------------------------------------------

/// One variable per tower, for the final norm and LM head, which run per tower on whole
/// slices (the block's sites are [`Stacked`]). A single tower is named without a modality
/// suffix (`lm_head.weight`), several are named by modality (`lm_head.image.weight`).
#[derive(Debug)]
pub(crate) struct Towers<T>(pub(crate) Vec<T>);

impl<T> Towers<T> {
    pub(crate) fn new(p: &nn::Path, n: usize, make: impl Fn(&nn::Path) -> T) -> Self {
        if n == 1 {
            Towers(vec![make(p)])
        } else {
            Towers(Modality::ALL[..n].iter().map(|m| make(&(p / m.as_str()))).collect())
        }
    }

    /// Tower `m`'s weights (the only tower when untied weights are not in use).
    pub(crate) fn pick(&self, m: usize) -> &T {
        &self.0[m.min(self.0.len() - 1)]
    }
}

/// A bias-free linear layer whose matmul runs in the compute precision.
#[derive(Debug)]
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
}

impl Linear {
    pub(crate) fn new(p: &nn::Path, d_in: i64, d_out: i64, std: f64) -> Self {
        Linear { weight: p.var("weight", &[d_out, d_in], nn::Init::Randn { mean: 0.0, stdev: std }) }
    }

    pub(crate) fn forward(&self, x: &Tensor, ck: Kind) -> Tensor {
        x.to_kind(ck).linear::<Tensor>(&self.weight.to_kind(ck), None)
    }
}

/// RMSNorm over the last dimension, computed in fp32.
#[derive(Debug)]
pub(crate) struct RmsNorm {
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
}

impl RmsNorm {
    pub(crate) fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm { weight: p.var("weight", &[dim], nn::Init::Const(1.0)), eps }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let dim = self.weight.size()[0];
        x.to_kind(Kind::Float).rms_norm([dim], Some(&self.weight), self.eps)
    }
}

/// Weightless RMSNorm over the last dimension, in fp32.
pub(crate) fn rms(x: &Tensor, eps: f64) -> Tensor {
    let dim = x.size()[x.dim() - 1];
    x.to_kind(Kind::Float).rms_norm([dim], None::<Tensor>, eps)
}

/// Suffix of a VarStore name that holds several named tensors stacked (see [`Stacked`]).
pub(crate) const STACKED: &str = "stacked";

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
pub(crate) struct Stacked {
    /// `[towers, n_parts * part[0], part[1..]]`.
    pub(crate) weight: Tensor,
}

impl Stacked {
    /// The same site sharing its tensor.
    pub(crate) fn shallow_clone(&self) -> Stacked {
        Stacked { weight: self.weight.shallow_clone() }
    }

    /// Parts of shape `part` (`[out, in]` for projections, `[dim]` for norm weights) for `towers`
    /// towers. `std: Some` draws N(0, std²) part by part, tower by tower, as one variable per
    /// tower and part would (so seeded weights do not depend on the storage layout); None
    /// initializes to ones (norms).
    pub(crate) fn new(p: &nn::Path, parts: &[&str], towers: usize, part: &[i64], std: Option<f64>) -> Self {
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

    pub(crate) fn towers(&self) -> i64 {
        self.weight.size()[0]
    }
}

/// A VarStore tensor `t` of variable `name` — the weights, or anything shaped like them
/// (gradients, optimizer moments) — as the named tensors a checkpoint holds: a [`Stacked`]
/// site becomes one view per tower and part (`layers.0.attn.q_proj.image.weight`, or
/// `q_proj.weight` with one tower); any other variable passes through. The views share
/// memory with `t`, so copying into them loads `t`.
pub fn public_views(name: &str, t: &Tensor) -> Vec<(String, Tensor)> {
    let size = t.size();
    let ranges = public_ranges(name, &size);
    if ranges.len() == 1 && ranges[0].0 == name {
        return vec![(name.to_string(), t.shallow_clone())];
    }
    // Towers outer, parts inner, as public_ranges lists them.
    let parts = ranges.len() / size[0].max(1) as usize;
    tch::no_grad(|| {
        ranges
            .into_iter()
            .enumerate()
            .map(|(i, (public, _, shape))| {
                let (m, j) = ((i / parts) as i64, (i % parts) as i64);
                (public, t.get(m).narrow(0, j * shape[0], shape[0]))
            })
            .collect()
    })
}

/// Where each of [`public_views`]'s tensors lies in variable `name` of shape `shape`, flattened
/// row-major: `(public name, first element, shape)`. Each is one contiguous run (a tower's
/// part is whole rows of the stacked tensor), which is what lets a rank's flat chunk be cut
/// into pieces of public tensors without the tensor itself (ZeRO-3 frees it between uses).
pub fn public_ranges(name: &str, shape: &[i64]) -> Vec<(String, i64, Vec<i64>)> {
    let whole = || vec![(name.to_string(), 0, shape.to_vec())];
    let Some(site) = name.strip_suffix(STACKED).and_then(|s| s.strip_suffix('.')) else { return whole() };
    if shape.len() < 2 {
        return whole();
    }
    let (prefix, parts) = site.rsplit_once('.').map_or(("", site), |(pre, last)| (pre, last));
    let parts: Vec<&str> = parts.split('+').collect();
    let (towers, rows, len) = (shape[0], shape[1], shape[1] / parts.len() as i64);
    let row: i64 = shape[2..].iter().product();
    let dot = if prefix.is_empty() { "" } else { "." };
    let mut out = Vec::with_capacity(towers as usize * parts.len());
    for m in 0..towers {
        let tower = match Modality::ALL.get(m as usize) {
            _ if towers == 1 => String::new(),
            Some(modality) => format!(".{}", modality.as_str()),
            None => format!(".{m}"),
        };
        for (j, part) in parts.iter().enumerate() {
            let mut s = vec![len];
            s.extend_from_slice(&shape[2..]);
            out.push((format!("{prefix}{dot}{part}{tower}.weight"), (m * rows + j as i64 * len) * row, s));
        }
    }
    out
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
pub(crate) struct TowerNorm {
    pub(crate) site: Stacked,
    pub(crate) eps: f64,
}

impl TowerNorm {
    pub(crate) fn shallow_clone(&self) -> TowerNorm {
        TowerNorm { site: self.site.shallow_clone(), eps: self.eps }
    }
}

impl TowerNorm {
    pub(crate) fn new(p: &nn::Path, names: &[&str], towers: usize, dim: i64, eps: f64) -> Self {
        TowerNorm { site: Stacked::new(p, names, towers, &[dim], None), eps }
    }

    /// `[towers, dim]`.
    pub(crate) fn weight(&self) -> &Tensor {
        &self.site.weight
    }

    /// The per-tower norm of `x` (`[N, dim]` layout order): one weightless norm over all rows
    /// (fp32), then each tower's weight on its rows.
    pub(crate) fn forward(&self, route: &Route, x: &Tensor) -> Tensor {
        let w = self.weight();
        if self.site.towers() == 1 {
            return self.forward_single(x);
        }
        rms(x, self.eps) * route.per_row(w)
    }

    /// Tower 0's norm on all rows (one tower, or MoE, whose models have one tower of norms).
    pub(crate) fn forward_single(&self, x: &Tensor) -> Tensor {
        let w = self.weight();
        // squeeze is a view both ways; select would zero-fill a `[towers, dim]` gradient.
        let w0 = if self.site.towers() == 1 { w.squeeze_dim(0) } else { w.get(0) };
        x.to_kind(Kind::Float).rms_norm([w.size()[1]], Some(&w0), self.eps)
    }
}

/// The site's weights `[towers, Σ out, in]` in the compute kind, with a pre-norm's per-tower
/// weight folded in: `W·diag(g)` applied to the weightless norm of x equals `W` applied to
/// `norm(x)·g`, and scales the small weight instead of every row.
pub(crate) fn site_weight(site: &Stacked, fold: Option<&TowerNorm>, ck: Kind) -> Tensor {
    match fold {
        Some(n) => (&site.weight * n.weight().unsqueeze(1)).to_kind(ck),
        None => site.weight.to_kind(ck),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ranges_are_where_the_public_views_lie() {
        for (name, shape) in [
            ("layers.0.attn.q_proj+k_proj.stacked", vec![3i64, 8, 5]),
            ("layers.1.ffn.w1.stacked", vec![1, 4, 6]),
            ("layers.1.norm.stacked", vec![3, 7]),
            ("embed.weight", vec![11, 4]),
        ] {
            let n: i64 = shape.iter().product();
            let t = Tensor::arange(n, (Kind::Float, tch::Device::Cpu)).view(shape.as_slice());
            let views = public_views(name, &t);
            let ranges = public_ranges(name, &shape);
            assert_eq!(views.len(), ranges.len(), "{name}");
            for ((vn, v), (rn, start, s)) in views.iter().zip(&ranges) {
                assert_eq!(vn, rn);
                assert_eq!(&v.size(), s, "{vn}");
                let want = Tensor::arange_start(*start, start + v.numel() as i64, (Kind::Float, tch::Device::Cpu));
                assert!(v.reshape([-1]).equal(&want), "{vn} is not elements {start}..");
            }
        }
    }
}
