//! Per-rank checkpoints (`train.checkpoint_format = "per_rank"`, the idea of torch's
//! distributed checkpoint): each rank writes its own chunk of the flat weights and AdamW
//! moments, so no rank gathers the model and the writes run on every rank at once; and
//! [`Stored`], which reads any checkpoint — per-rank files or whole tensors — a range at a
//! time from memory maps, so a resuming rank reads only what it will own, on any world size.
//!
//! A rank's chunk of the flat buffers ([`crate::flat`]) cuts across parameters; it is stored
//! as [`Piece`]s of the public (per-tower) tensors, keyed `<name>@<first element>`, in
//! `model-rank-RRRRR-of-WWWWW.safetensors` and `optimizer-rank-…` (moments as
//! `<name>.exp_avg@…`). `ranks.json` lists every tensor's shape and where its pieces lie.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::TrainError;
use crate::flat::Layout;
use crate::towers::public_ranges;

/// The index of a per-rank checkpoint.
pub const INDEX_FILE: &str = "ranks.json";
pub const INDEX_VERSION: u32 = 1;
/// AdamW's moments, stored as `<weight name>.<suffix>`.
pub const MOMENTS: [&str; 2] = ["exp_avg", "exp_avg_sq"];
/// More ranks than any job motley launches has (the launcher's limit is per node).
const MAX_WORLD: usize = 1 << 16;

pub fn model_file(rank: usize, world: usize) -> String {
    format!("model-rank-{rank:05}-of-{world:05}.safetensors")
}

pub fn optimizer_file(rank: usize, world: usize) -> String {
    format!("optimizer-rank-{rank:05}-of-{world:05}.safetensors")
}

/// Whether `name` is one rank's file of a per-rank checkpoint (with a run mirrored to an
/// object store, each rank copies its own there).
pub fn is_rank_file(name: &str) -> bool {
    (name.starts_with("model-rank-") || name.starts_with("optimizer-rank-")) && name.ends_with(".safetensors")
}

/// The files of a checkpoint that `world` ranks wrote, rank by rank.
pub fn rank_files(world: usize) -> Vec<String> {
    (0..world).flat_map(|r| [model_file(r, world), optimizer_file(r, world)]).collect()
}

/// Whether `name` is a stored moment rather than a weight.
pub fn is_moment(name: &str) -> bool {
    MOMENTS.iter().any(|m| name.strip_suffix(m).is_some_and(|s| s.ends_with('.')))
}

/// A run of public tensor `name`'s elements that one rank owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub name: String,
    /// First element, in the public tensor flattened row-major.
    pub start: i64,
    pub len: i64,
    /// Where it lies in the flat buffers, and in the owning rank's shard buffer.
    pub flat: i64,
    pub shard: i64,
}

/// The pieces rank `rank` owns under `layout`; `params` are the optimizer's parameters
/// (variable name, shape), by index.
pub fn pieces(layout: &Layout, params: &[(String, Vec<i64>)], rank: usize) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut entries: Vec<&crate::flat::Entry> = layout.entries.iter().collect();
    entries.sort_by_key(|e| e.offset);
    for (b, k) in layout.buckets.iter().enumerate() {
        let (cstart, clen) = layout.chunk(b, rank);
        let cend = cstart + clen;
        for e in entries.iter().filter(|e| e.bucket == b) {
            let (lo, hi) = (e.offset.max(cstart), (e.offset + e.numel).min(cend));
            if lo >= hi {
                continue;
            }
            let (name, shape) = &params[e.param];
            for (public, pstart, pshape) in public_ranges(name, shape) {
                let pn: i64 = pshape.iter().product();
                let (a, z) = ((lo - e.offset).max(pstart), (hi - e.offset).min(pstart + pn));
                if a < z {
                    let flat = e.offset + a;
                    out.push(Piece {
                        name: public,
                        start: a - pstart,
                        len: z - a,
                        flat,
                        shard: k.shard_offset + flat - cstart,
                    });
                }
            }
        }
    }
    out
}

/// `ranks.json`: every stored tensor's shape and pieces (`[rank, first element, length]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankIndex {
    pub version: u32,
    pub world: usize,
    pub tensors: BTreeMap<String, IndexedTensor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexedTensor {
    pub shape: Vec<i64>,
    pub pieces: Vec<[i64; 3]>,
}

impl RankIndex {
    /// The index of the per-rank checkpoint in `ckpt`, its version and world checked.
    pub fn read(ckpt: &Path) -> Result<Self, TrainError> {
        let path = ckpt.join(INDEX_FILE);
        let bad = |msg: String| TrainError::Checkpoint { path: path.clone(), msg };
        let text = std::fs::read_to_string(&path).map_err(TrainError::io("read", &path))?;
        let index: RankIndex = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if index.version != INDEX_VERSION {
            return Err(bad(format!("version {}, this motley reads {INDEX_VERSION}", index.version)));
        }
        if index.world == 0 || index.world > MAX_WORLD {
            return Err(bad(format!("world of {} ranks", index.world)));
        }
        Ok(index)
    }

    /// The index of a checkpoint every rank of `layout`'s world writes: computed from the
    /// layout alone, so rank 0 writes it without hearing from the others.
    pub fn new(layout: &Layout, params: &[(String, Vec<i64>)]) -> Self {
        let mut tensors: BTreeMap<String, IndexedTensor> = BTreeMap::new();
        for (name, shape) in params {
            for (public, _, pshape) in public_ranges(name, shape) {
                for key in std::iter::once(public.clone()).chain(MOMENTS.iter().map(|m| format!("{public}.{m}"))) {
                    tensors.insert(key, IndexedTensor { shape: pshape.clone(), pieces: Vec::new() });
                }
            }
        }
        for rank in 0..layout.world {
            for p in pieces(layout, params, rank) {
                for key in std::iter::once(p.name.clone()).chain(MOMENTS.iter().map(|m| format!("{}.{m}", p.name))) {
                    if let Some(t) = tensors.get_mut(&key) {
                        t.pieces.push([rank as i64, p.start, p.len]);
                    }
                }
            }
        }
        for t in tensors.values_mut() {
            t.pieces.sort_by_key(|p| p[1]);
        }
        RankIndex { version: INDEX_VERSION, world: layout.world, tensors }
    }
}

/// What a rank stores from: its flat parameter and moment buffers, each either the whole
/// flat buffer or this rank's shard of it.
#[derive(Debug)]
pub struct RankBuffers {
    pub param: Tensor,
    pub param_sharded: bool,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub moments_sharded: bool,
}

/// Host copies of this rank's pieces (weights, moments), keyed as in its files: a snapshot
/// the next step cannot change, so the files may be written on another thread.
#[allow(clippy::type_complexity)]
pub fn host_pieces(
    pieces: &[Piece],
    b: &RankBuffers,
) -> Result<(Vec<(String, Tensor)>, Vec<(String, Tensor)>), TrainError> {
    let copy = |src: &Tensor, at: i64, len: i64, key: &str| -> Result<Tensor, TrainError> {
        let mut host = Tensor::empty([len], (src.kind(), Device::Cpu));
        tch::no_grad(|| host.f_copy_(&src.narrow(0, at, len)))
            .map_err(TrainError::torch(format!("copy {key} to the host")))?;
        Ok(host)
    };
    let (mut weights, mut moments) = (Vec::with_capacity(pieces.len()), Vec::with_capacity(2 * pieces.len()));
    for p in pieces {
        let key = format!("{}@{}", p.name, p.start);
        let at = if b.param_sharded { p.shard } else { p.flat };
        weights.push((key.clone(), copy(&b.param, at, p.len, &key)?));
        let at = if b.moments_sharded { p.shard } else { p.flat };
        for (m, src) in MOMENTS.iter().zip([&b.exp_avg, &b.exp_avg_sq]) {
            let key = format!("{}.{m}@{}", p.name, p.start);
            moments.push((key.clone(), copy(src, at, p.len, &key)?));
        }
    }
    Ok((weights, moments))
}

/// Writes rank `rank`'s two files into `dir` (each through a temporary name, fsynced).
pub fn write_rank(
    dir: &Path,
    rank: usize,
    world: usize,
    weights: Vec<(String, Tensor)>,
    moments: Vec<(String, Tensor)>,
) -> Result<(), TrainError> {
    for (name, tensors) in [(model_file(rank, world), weights), (optimizer_file(rank, world), moments)] {
        let (path, tmp) = (dir.join(&name), dir.join(format!(".{name}.tmp")));
        Tensor::write_safetensors(&tensors, &tmp)
            .map_err(|e| TrainError::Checkpoint { path: tmp.clone(), msg: e.to_string() })?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(TrainError::io("sync", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(TrainError::io("rename", &path))?;
    }
    Ok(())
}

/// One memory-mapped safetensors file and its header.
#[derive(Debug)]
struct Mapped {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
    meta: Metadata,
}

/// Where a stored tensor's elements are: (file, key in it, first element, length).
type Located = (usize, String, i64, i64);

#[derive(Debug)]
struct StoredTensor {
    shape: Vec<i64>,
    kind: Kind,
    pieces: Vec<Located>,
}

/// A checkpoint's tensors, read a range at a time: from per-rank files through `ranks.json`,
/// or from whole-tensor files (`model.safetensors` or the shards its index names, and
/// `optimizer.safetensors`).
#[derive(Debug)]
pub struct Stored {
    origin: PathBuf,
    /// Ranks that wrote a per-rank checkpoint (None: whole-tensor files).
    world: Option<usize>,
    files: Vec<Mapped>,
    tensors: BTreeMap<String, StoredTensor>,
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        _ => return None,
    })
}

fn numel(shape: &[i64]) -> Option<i64> {
    shape.iter().try_fold(1i64, |a, &d| if d < 0 { None } else { a.checked_mul(d) })
}

impl Stored {
    /// Whether `ckpt` is a per-rank checkpoint.
    pub fn is_per_rank(ckpt: &Path) -> bool {
        ckpt.join(INDEX_FILE).exists()
    }

    /// The checkpoint's weights and, with `optimizer`, its moments.
    pub fn open(ckpt: &Path, optimizer: bool) -> Result<Self, TrainError> {
        if Self::is_per_rank(ckpt) { Self::open_per_rank(ckpt, optimizer) } else { Self::open_whole(ckpt, optimizer) }
    }

    fn map(path: &Path) -> Result<Mapped, TrainError> {
        let bad = |msg: String| TrainError::Checkpoint { path: path.to_path_buf(), msg };
        if !path.exists() {
            return Err(bad("missing".into()));
        }
        let file = std::fs::File::open(path).map_err(TrainError::io("open", path))?;
        // SAFETY: checkpoint files are written once (through a rename) and never changed in
        // place; a file truncated under a reader is outside what any reader survives.
        let map = unsafe { Mmap::map(&file) }.map_err(TrainError::io("map", path))?;
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        Ok(Mapped { path: path.to_path_buf(), map, data_start: 8 + n, meta })
    }

    fn open_whole(ckpt: &Path, optimizer: bool) -> Result<Self, TrainError> {
        let mut names: Vec<PathBuf> = match crate::checkpoint::read_index(ckpt)? {
            Some((_, _, files)) => files.into_iter().map(|f| ckpt.join(f)).collect(),
            None => vec![ckpt.join(crate::checkpoint::MODEL_FILE)],
        };
        let origin = names.first().cloned().unwrap_or_default();
        if optimizer {
            names.push(ckpt.join(crate::checkpoint::OPTIMIZER_FILE));
        }
        let mut s = Stored { origin, world: None, files: Vec::new(), tensors: BTreeMap::new() };
        for path in names {
            let m = Self::map(&path)?;
            let bad = |msg: String| TrainError::Checkpoint { path: path.clone(), msg };
            let idx = s.files.len();
            for (name, info) in m.meta.tensors() {
                let kind = kind_of(info.dtype)
                    .ok_or_else(|| bad(format!("{name} is {:?}, not floating point", info.dtype)))?;
                let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
                let n = numel(&shape).ok_or_else(|| bad(format!("{name}: size overflows")))?;
                let t = StoredTensor { shape, kind, pieces: vec![(idx, name.clone(), 0, n)] };
                if s.tensors.insert(name.clone(), t).is_some() {
                    return Err(bad(format!("{name} is stored twice")));
                }
            }
            s.files.push(m);
        }
        Ok(s)
    }

    fn open_per_rank(ckpt: &Path, optimizer: bool) -> Result<Self, TrainError> {
        let index_path = ckpt.join(INDEX_FILE);
        let bad = |msg: String| TrainError::Checkpoint { path: index_path.clone(), msg };
        let index = RankIndex::read(ckpt)?;
        let world = index.world;
        let mut s =
            Stored { origin: index_path.clone(), world: Some(world), files: Vec::new(), tensors: BTreeMap::new() };
        // File `rank` holds the weights, `world + rank` the moments.
        for rank in 0..world {
            s.files.push(Self::map(&ckpt.join(model_file(rank, world))).map_err(|e| shared_hint(e, world))?);
        }
        if optimizer {
            for rank in 0..world {
                s.files.push(Self::map(&ckpt.join(optimizer_file(rank, world))).map_err(|e| shared_hint(e, world))?);
            }
        }
        let mut expected = vec![0usize; s.files.len()];
        for (name, t) in index.tensors {
            let moment = is_moment(&name);
            if moment && !optimizer {
                continue;
            }
            if name.contains('@') {
                return Err(bad(format!("tensor name {name:?} contains '@'")));
            }
            let n = numel(&t.shape).ok_or_else(|| bad(format!("{name}: shape {:?}", t.shape)))?;
            // The pieces tile the tensor: in order, each starting where the last ended.
            let (mut at, mut kind, mut pieces) = (0i64, None, Vec::with_capacity(t.pieces.len()));
            for &[rank, start, len] in &t.pieces {
                if rank < 0 || rank as usize >= world || start != at || len <= 0 || len > n - at {
                    return Err(bad(format!(
                        "{name}: piece [{rank}, {start}, {len}] does not continue at element {at} of {n}"
                    )));
                }
                let file = if moment { world + rank as usize } else { rank as usize };
                let key = format!("{name}@{start}");
                let m = &s.files[file];
                let info = m.meta.info(&key).ok_or_else(|| TrainError::Checkpoint {
                    path: m.path.clone(),
                    msg: format!("lacks {key}, which {INDEX_FILE} places there"),
                })?;
                let k = kind_of(info.dtype).filter(|_| info.shape == [len as usize]).ok_or_else(|| {
                    TrainError::Checkpoint {
                        path: m.path.clone(),
                        msg: format!("{key} is {:?} {:?}, {INDEX_FILE} says {len} floats", info.dtype, info.shape),
                    }
                })?;
                if kind.is_some_and(|prev| prev != k) {
                    return Err(bad(format!("{name}: pieces of different dtypes")));
                }
                kind = Some(k);
                expected[file] += 1;
                pieces.push((file, key, start, len));
                at += len;
            }
            if at != n {
                return Err(bad(format!("{name}: pieces cover {at} of its {n} elements")));
            }
            s.tensors.insert(name, StoredTensor { shape: t.shape, kind: kind.unwrap_or(Kind::Float), pieces });
        }
        for (m, want) in s.files.iter().zip(expected) {
            let have = m.meta.tensors().len();
            if have != want {
                return Err(TrainError::Checkpoint {
                    path: m.path.clone(),
                    msg: format!("holds {have} tensors, {INDEX_FILE} names {want} there"),
                });
            }
        }
        Ok(s)
    }

    /// Ranks that wrote it, for a per-rank checkpoint.
    pub fn world(&self) -> Option<usize> {
        self.world
    }

    /// The file errors about the checkpoint as a whole name (`ranks.json`, or the model file).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The file tensor `name` is in (its first piece's), for errors.
    pub fn origin_of(&self, name: &str) -> PathBuf {
        self.tensors
            .get(name)
            .and_then(|t| t.pieces.first())
            .map_or_else(|| self.origin.clone(), |p| self.files[p.0].path.clone())
    }

    /// Every stored name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Elements of the stored weights (moments not counted).
    pub fn weight_elements(&self) -> i64 {
        self.tensors
            .iter()
            .filter(|(n, _)| !is_moment(n))
            .map(|(_, t)| numel(&t.shape).unwrap_or(0))
            .fold(0i64, i64::saturating_add)
    }

    /// Elements `start..start + len` of tensor `name` flattened, as a 1-D host tensor.
    pub fn range(&self, name: &str, start: i64, len: i64) -> Result<Tensor, TrainError> {
        let t = self.tensors.get(name).ok_or_else(|| TrainError::Checkpoint {
            path: self.origin.clone(),
            msg: format!("missing tensor {name}"),
        })?;
        let n = numel(&t.shape).unwrap_or(0);
        if start < 0 || len < 0 || start + len > n {
            return Err(TrainError::Checkpoint {
                path: self.origin.clone(),
                msg: format!("elements {start}..{} of {name}, which has {n}", start + len),
            });
        }
        let el = t.kind.elt_size_in_bytes();
        let mut bytes = Vec::with_capacity(len as usize * el);
        for (file, key, pstart, plen) in &t.pieces {
            let (a, z) = (start.max(*pstart), (start + len).min(pstart + plen));
            if a >= z {
                continue;
            }
            let m = &self.files[*file];
            // Present and in bounds: checked when the header was read.
            let (off, _) = m.meta.info(key).map(|i| i.data_offsets).unwrap_or_default();
            let from = m.data_start + off + (a - pstart) as usize * el;
            bytes.extend_from_slice(&m.map[from..from + (z - a) as usize * el]);
        }
        Tensor::f_from_data_size(&bytes, &[len], t.kind).map_err(TrainError::torch(format!("read {name}")))
    }

    /// Tensor `name` whole, in its shape.
    pub fn read(&self, name: &str) -> Result<Tensor, TrainError> {
        let shape = self.shape(name).map(<[i64]>::to_vec).unwrap_or_default();
        let n = numel(&shape).unwrap_or(0);
        Ok(self.range(name, 0, n)?.view(shape.as_slice()))
    }
}

/// A per-rank file that is missing is most often one written on another machine's disk.
fn shared_hint(e: TrainError, world: usize) -> TrainError {
    match e {
        TrainError::Checkpoint { path, msg } if msg == "missing" => TrainError::Checkpoint {
            path,
            msg: format!(
                "missing: a per_rank checkpoint needs all {world} ranks' files in one folder (a run directory every \
                 node shares, or `--out s3://…`, where each rank copies its own files)"
            ),
        },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flat::{BucketCap, ParamInfo};

    fn params() -> Vec<(String, Vec<i64>)> {
        vec![
            ("embed.weight".into(), vec![13, 4]),
            ("layers.0.attn.q_proj+k_proj.stacked".into(), vec![3, 8, 4]),
            ("layers.0.norm.stacked".into(), vec![3, 4]),
            ("layers.1.ffn.w1.stacked".into(), vec![3, 6, 4]),
            ("norm.weight".into(), vec![4]),
        ]
    }

    fn layouts(world: usize) -> Vec<Layout> {
        let ps = params();
        let infos: Vec<ParamInfo<'_>> =
            ps.iter().map(|(n, s)| ParamInfo { name: n, numel: s.iter().product(), decay: s.len() > 2 }).collect();
        vec![Layout::units(&infos, world), Layout::new(&infos, world, BucketCap { first: 20, rest: 40 })]
    }

    #[test]
    fn every_rank_s_pieces_tile_each_public_tensor_once() {
        for world in 1..=5 {
            for layout in layouts(world) {
                let index = RankIndex::new(&layout, &params());
                for (name, t) in &index.tensors {
                    let mut at = 0;
                    for [_, start, len] in &t.pieces {
                        assert_eq!(*start, at, "{name} at world {world}");
                        at += len;
                    }
                    assert_eq!(at, t.shape.iter().product::<i64>(), "{name} at world {world}");
                }
                // A piece's shard position is inside its rank's shard and matches its flat one.
                for rank in 0..world {
                    for p in pieces(&layout, &params(), rank) {
                        assert!(p.shard >= 0 && p.shard + p.len <= layout.shard_total());
                        let b = layout.buckets.iter().position(|k| p.flat >= k.start && p.flat < k.start + k.len);
                        let (cstart, _) = layout.chunk(b.expect("bucket"), rank);
                        assert!(p.flat >= cstart);
                    }
                }
            }
        }
    }

    #[test]
    fn moments_are_told_from_weights_by_suffix() {
        assert!(is_moment("layers.0.q_proj.text.weight.exp_avg"));
        assert!(is_moment("norm.weight.exp_avg_sq"));
        assert!(!is_moment("norm.weight"));
        assert!(!is_moment("exp_avg"));
    }
}
