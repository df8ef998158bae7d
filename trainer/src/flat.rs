//! Where every parameter lives in the optimizer's flat buffers, how those buffers split into
//! communication buckets, and which chunk of each bucket a rank owns under ZeRO.
//!
//! Order: weight-decayed parameters first (one contiguous range, so decay is one number per
//! fused call), the rest after; within each group in the order backward produces gradients
//! (head and final norm, the last layer, …, the first layer, the embedding), so buckets fill
//! in the order their collectives can start. Buckets follow torch DDP's sizes (the first
//! 1 MiB, then 25 MiB), never split a parameter or cross the decay boundary, and are padded
//! with zeros to a multiple of `world × 4` elements so every rank's chunk is equal and
//! 16-byte aligned.
//!
//! Under ZeRO-3 ([`Layout::units`]) the buckets are the units weights are gathered in instead:
//! everything outside the blocks (embedding, final norm, head, latent projections) is unit 0
//! and block `i` is unit `i + 1`, each split only at the decay boundary, whatever its size.

/// One parameter's place in the flat buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Index into the optimizer's parameter list.
    pub param: usize,
    pub offset: i64,
    pub numel: i64,
    pub bucket: usize,
}

/// A contiguous range of the flat buffers reduced by one collective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub start: i64,
    /// Elements including the padding (a multiple of the world size).
    pub len: i64,
    pub decay: bool,
    /// Offset of this bucket's chunk in a rank's shard buffer (`Σ len / world` before it).
    pub shard_offset: i64,
    /// The ZeRO-3 unit the bucket belongs to (0 in a data-parallel layout).
    pub unit: usize,
}

/// The flat layout for a world of `world` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// In flat order.
    pub entries: Vec<Entry>,
    pub buckets: Vec<Bucket>,
    /// Length of the flat buffers (padding included).
    pub total: i64,
    pub world: usize,
}

/// What the layout needs to know of a parameter.
#[derive(Debug, Clone)]
pub struct ParamInfo<'a> {
    pub name: &'a str,
    pub numel: i64,
    pub decay: bool,
}

/// Bucket sizes in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketCap {
    pub first: i64,
    pub rest: i64,
}

impl BucketCap {
    /// torch DDP's caps (1 MiB first, then `mib` MiB) for elements of `elem_bytes`.
    pub fn ddp(mib: f64, elem_bytes: i64) -> Self {
        let el = |m: f64| ((m * 1024.0 * 1024.0) as i64 / elem_bytes.max(1)).max(1);
        BucketCap { first: el(1.0f64.min(mib)), rest: el(mib) }
    }
}

/// Order in which backward finishes a parameter's gradient: 0 for the output side (LM head,
/// final norm, diffusion output), 1 + (layers − i) for layer i, last the input side.
fn backward_rank(name: &str) -> (u8, i64) {
    if let Some(rest) = name.strip_prefix("layers.") {
        let i = rest.split('.').next().and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
        return (1, -i);
    }
    match name.split('.').next().unwrap_or_default() {
        "embed" | "latent_in" | "time_embed" => (2, 0),
        _ => (0, 0),
    }
}

/// ZeRO-3 unit of a parameter: 0 outside the blocks, `i + 1` for block `i`.
pub fn unit_of(name: &str) -> usize {
    name.strip_prefix("layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|s| s.parse::<usize>().ok())
        .map_or(0, |i| i + 1)
}

fn round_up(n: i64, to: i64) -> i64 {
    let to = to.max(1);
    (n + to - 1) / to * to
}

impl Layout {
    pub fn new(params: &[ParamInfo<'_>], world: usize, cap: BucketCap) -> Self {
        let mut order: Vec<usize> = (0..params.len()).collect();
        order.sort_by(|&a, &b| {
            let (pa, pb) = (&params[a], &params[b]);
            (!pa.decay, backward_rank(pa.name), pa.name).cmp(&(!pb.decay, backward_rank(pb.name), pb.name))
        });
        Self::build(params, &order, world, cap, false)
    }

    /// The ZeRO-3 layout: one bucket per unit and decay group, units in order.
    pub fn units(params: &[ParamInfo<'_>], world: usize) -> Self {
        let mut order: Vec<usize> = (0..params.len()).collect();
        order.sort_by(|&a, &b| {
            let (pa, pb) = (&params[a], &params[b]);
            (unit_of(pa.name), !pa.decay, pa.name).cmp(&(unit_of(pb.name), !pb.decay, pb.name))
        });
        Self::build(params, &order, world, BucketCap { first: i64::MAX, rest: i64::MAX }, true)
    }

    fn build(params: &[ParamInfo<'_>], order: &[usize], world: usize, cap: BucketCap, units: bool) -> Self {
        let world = world.max(1);
        let align = world as i64 * 4;
        let mut entries = Vec::with_capacity(params.len());
        let mut buckets: Vec<Bucket> = Vec::new();
        // The open bucket: (start, decay, filled, unit).
        let (mut offset, mut open): (i64, Option<(i64, bool, i64, usize)>) = (0, None);
        let close = |buckets: &mut Vec<Bucket>, offset: &mut i64, open: &mut Option<(i64, bool, i64, usize)>| {
            if let Some((start, decay, filled, unit)) = open.take() {
                let len = round_up(filled, align);
                let shard_offset = buckets.iter().map(|b| b.len / world as i64).sum();
                buckets.push(Bucket { start, len, decay, shard_offset, unit });
                *offset = start + len;
            }
        };
        for &i in order {
            let p = &params[i];
            let unit = if units { unit_of(p.name) } else { 0 };
            let limit = if buckets.is_empty() { cap.first } else { cap.rest };
            if let Some((_, decay, filled, u)) = open
                && (decay != p.decay || u != unit || (filled > 0 && filled + p.numel > limit))
            {
                close(&mut buckets, &mut offset, &mut open);
            }
            let (start, _, filled, _) = open.get_or_insert((offset, p.decay, 0, unit));
            entries.push(Entry { param: i, offset: *start + *filled, numel: p.numel, bucket: buckets.len() });
            *filled += p.numel;
        }
        close(&mut buckets, &mut offset, &mut open);
        Layout { entries, buckets, total: offset, world }
    }

    /// Elements of the decayed prefix (whole buckets).
    pub fn decayed(&self) -> i64 {
        self.buckets.iter().filter(|b| b.decay).map(|b| b.len).sum()
    }

    /// Elements a rank owns under ZeRO (`total / world`).
    pub fn shard_total(&self) -> i64 {
        self.total / self.world as i64
    }

    /// `(start, len)` of rank `rank`'s chunk of bucket `b` in the flat buffers.
    pub fn chunk(&self, b: usize, rank: usize) -> (i64, i64) {
        let k = &self.buckets[b];
        let len = k.len / self.world as i64;
        (k.start + rank as i64 * len, len)
    }

    /// Units of a ZeRO-3 layout (the largest unit index + 1).
    pub fn n_units(&self) -> usize {
        self.buckets.iter().map(|b| b.unit + 1).max().unwrap_or(0)
    }

    /// Bucket index of each parameter (by parameter index).
    pub fn bucket_of(&self, n_params: usize) -> Vec<i64> {
        let mut v = vec![0i64; n_params];
        for e in &self.entries {
            v[e.param] = e.bucket as i64;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, numel: i64, decay: bool) -> ParamInfo<'_> {
        ParamInfo { name, numel, decay }
    }

    #[test]
    fn decayed_first_in_backward_order_and_padded_buckets() {
        let params = [
            info("embed.weight", 100, false),
            info("layers.0.attn.qkv.stacked", 30, true),
            info("layers.1.attn.qkv.stacked", 30, true),
            info("layers.10.attn.qkv.stacked", 30, true),
            info("layers.0.attn_norm.stacked", 5, false),
            info("lm_head.weight", 40, true),
        ];
        let l = Layout::new(&params, 3, BucketCap { first: 50, rest: 70 });
        let names: Vec<&str> = l.entries.iter().map(|e| params[e.param].name).collect();
        assert_eq!(
            names,
            [
                "lm_head.weight",
                "layers.10.attn.qkv.stacked",
                "layers.1.attn.qkv.stacked",
                "layers.0.attn.qkv.stacked",
                "layers.0.attn_norm.stacked",
                "embed.weight"
            ]
        );
        // Buckets: [lm_head 40] (first cap 50), [l10 + l1 = 60], [l0 30] | [norm 5 + embed 100?]
        let lens: Vec<(i64, i64, bool)> = l.buckets.iter().map(|b| (b.start, b.len, b.decay)).collect();
        assert_eq!(lens, vec![(0, 48, true), (48, 60, true), (108, 36, true), (144, 12, false), (156, 108, false)]);
        assert_eq!(l.total, 264);
        assert_eq!(l.decayed(), 144);
        for b in &l.buckets {
            assert_eq!(b.len % 12, 0, "a multiple of world × 4");
        }
        // Entries never straddle buckets and sit inside them.
        for e in &l.entries {
            let b = &l.buckets[e.bucket];
            assert!(e.offset >= b.start && e.offset + e.numel <= b.start + b.len, "{e:?} in {b:?}");
        }
        assert_eq!(l.chunk(1, 2), (48 + 40, 20));
        assert_eq!(l.buckets[2].shard_offset, (48 + 60) / 3);
        assert_eq!(l.shard_total(), 88);
        assert_eq!(l.bucket_of(6), vec![4, 2, 1, 1, 3, 0]);
    }

    #[test]
    fn units_group_each_block_split_only_at_the_decay_boundary() {
        let params = [
            info("embed.weight", 100, false),
            info("layers.1.attn.qkv.stacked", 30, true),
            info("layers.0.attn.qkv.stacked", 30, true),
            info("layers.0.ffn.down.stacked", 3000, true),
            info("layers.0.attn_norm.stacked", 5, false),
            info("lm_head.weight", 40, true),
        ];
        let l = Layout::units(&params, 2);
        let got: Vec<(usize, bool, i64)> = l.buckets.iter().map(|b| (b.unit, b.decay, b.len)).collect();
        assert_eq!(got, vec![(0, true, 40), (0, false, 104), (1, true, 3032), (1, false, 8), (2, true, 32)]);
        assert_eq!(l.n_units(), 3);
        for e in &l.entries {
            assert_eq!(l.buckets[e.bucket].unit, unit_of(params[e.param].name));
        }
        assert_eq!(unit_of("layers.12.x"), 13);
        assert_eq!(unit_of("latent_in.weight"), 0);
    }

    #[test]
    fn one_rank_pads_to_four_and_big_parameters_get_their_own_bucket() {
        let params = [info("a", 10, true), info("b", 1000, true), info("c", 3, true)];
        let l = Layout::new(&params, 1, BucketCap::ddp(25.0, 4));
        assert_eq!(l.buckets.len(), 1, "all under 1 MiB");
        assert_eq!(l.total, 1016);
        let l = Layout::new(&params, 1, BucketCap { first: 100, rest: 100 });
        assert_eq!(l.buckets.iter().map(|b| b.len).collect::<Vec<_>>(), vec![12, 1000, 4]);
    }
}
