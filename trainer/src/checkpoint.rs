//! Checkpoints: `model.safetensors`, `optimizer.safetensors` and `meta.json` in
//! `RUN/checkpoints/step-NNNNNNNN/`, written into a temporary folder and renamed into place,
//! so a crash leaves either the previous checkpoint or the new one, never half of one.
//! Beside them, `RUN/tokenizers/` keeps the corpus's tokenizer files and every `meta.json` its
//! vocabulary, so a run samples and decodes after its corpus has moved or gone.
//!
//! Weights over `train.checkpoint_shard_mb` are split as Hugging Face does it:
//! `model-00001-of-00003.safetensors` … and `model.safetensors.index.json` mapping each tensor
//! name to its file. Names are the public per-tower ones, so any tool that reads HF
//! checkpoints reads these. Optimizer moments are stored under the same names, so a run
//! resumes on any number of ranks with or without ZeRO. With `train.checkpoint_format =
//! "per_rank"` each rank writes its own pieces instead ([`crate::per_rank`]); both formats
//! complete through [`commit`] and are read by [`read_model`] and [`crate::per_rank::Stored`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use motley_shards::Vocab;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor, nn};

use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::model::public_parameters;
use crate::per_rank::Stored;

pub const MODEL_FILE: &str = "model.safetensors";
/// The index of a sharded model (`weight_map`: tensor name → file), as in HF checkpoints.
pub const MODEL_INDEX: &str = "model.safetensors.index.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const META_FILE: &str = "meta.json";
pub const META_VERSION: u32 = 1;
/// The run's copies of its corpus's tokenizers: `text.json`, `image.safetensors`,
/// `speech.safetensors` (the layout `motley sample --tokenizers` reads).
pub const TOKENIZERS_DIR: &str = "tokenizers";

/// Everything besides tensors that exact resume needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Steps whose update was dropped for a non-finite loss, in total and in a row.
    pub skipped: u64,
    pub skipped_in_a_row: u64,
    /// Resolved configuration of the run.
    pub config: TrainConfig,
    /// Train data position (`BatchSource::state`).
    pub loader_state: serde_json::Value,
    /// Random state. Training draws no random numbers after initialization (no dropout,
    /// deterministic routing), so the seed that drew the initial weights is all there is.
    pub rng: RngState,
    /// AdamW step count per parameter.
    pub optimizer_steps: BTreeMap<String, i64>,
    /// Tokens processed so far (this rank).
    pub tokens: u64,
    /// The corpus's global vocabulary (absent in checkpoints written before it was recorded:
    /// readers then take it from the corpus manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<Vocab>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RngState {
    pub init_seed: u64,
    pub draws_after_init: u64,
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    {
        let mut f = std::fs::File::create(&tmp).map_err(TrainError::io("create", &tmp))?;
        f.write_all(bytes).map_err(TrainError::io("write", &tmp))?;
        f.sync_all().map_err(TrainError::io("sync", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(TrainError::io("rename", path))
}

/// Puts the tokenizer files `files` (modality, path) into `RUN/tokenizers/` as
/// `<modality>.<extension>`: hard-linked where the file system allows (ingest replaces files by
/// renaming, so a link keeps the bytes the run trained with), else copied through a temporary
/// file. A file already there with the same bytes is kept; other files in the folder (from a
/// corpus the run no longer uses) are removed. Returns the files now there.
pub fn snapshot_tokenizers(run: &Path, files: &[(String, PathBuf)]) -> Result<Vec<PathBuf>, TrainError> {
    let dir = run.join(TOKENIZERS_DIR);
    if files.is_empty() && !dir.exists() {
        return Ok(Vec::new()); // synthetic data: no folder that would promise tokenizers
    }
    std::fs::create_dir_all(&dir).map_err(TrainError::io("create", &dir))?;
    let mut kept = Vec::new();
    for (modality, src) in files {
        // Names come from someone's manifest: only plain modality names become file names.
        if modality.is_empty() || !modality.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            continue;
        }
        let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("bin");
        let dst = dir.join(format!("{modality}.{ext}"));
        // An unreadable source fails in the copy below, with its name.
        if !same_bytes(src, &dst).unwrap_or(false) {
            let tmp = dir.join(format!(".{modality}.{ext}.tmp"));
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(src, &tmp).is_err() {
                std::fs::copy(src, &tmp).map_err(TrainError::io("copy tokenizer", src))?;
            }
            std::fs::rename(&tmp, &dst).map_err(TrainError::io("rename", &dst))?;
        }
        kept.push(dst);
    }
    for entry in std::fs::read_dir(&dir).map_err(TrainError::io("list", &dir))? {
        let path = entry.map_err(TrainError::io("list", &dir))?.path();
        if path.is_file() && !kept.contains(&path) {
            std::fs::remove_file(&path).map_err(TrainError::io("remove", &path))?;
        }
    }
    if kept.is_empty() {
        let _ = std::fs::remove_dir(&dir);
    }
    Ok(kept)
}

/// Whether `b` exists and holds exactly `a`'s bytes (the same file counts without reading).
fn same_bytes(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let ma = std::fs::metadata(a)?;
    let Ok(mb) = std::fs::metadata(b) else { return Ok(false) };
    if ma.len() != mb.len() {
        return Ok(false);
    }
    if (ma.dev(), ma.ino()) == (mb.dev(), mb.ino()) {
        return Ok(true);
    }
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// The run directory of a checkpoint folder (`RUN/checkpoints/step-N` → `RUN`).
pub fn run_of(ckpt: &Path) -> Option<&Path> {
    ckpt.parent().filter(|p| p.file_name().is_some_and(|n| n == "checkpoints")).and_then(Path::parent)
}

fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// The folder of the checkpoint of `step` in `run` (`RUN/checkpoints/step-NNNNNNNN`).
pub fn dir_of(run: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run).join(step_name(step))
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Complete checkpoints of a run, oldest first.
pub fn list(run: &Path) -> Result<Vec<(u64, PathBuf)>, TrainError> {
    let dir = checkpoints_dir(run);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(TrainError::io("list checkpoints", &dir))? {
        let entry = entry.map_err(TrainError::io("list checkpoints", &dir))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok())
            && entry.path().join(META_FILE).exists()
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Resolves `path` to a checkpoint folder: a checkpoint itself, or a run (its latest one).
pub fn resolve(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join(META_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        return Err(TrainError::Checkpoint { path: path.to_path_buf(), msg: "does not exist".into() });
    }
    list(path)?.pop().map(|(_, p)| p).ok_or_else(|| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg: "holds no complete checkpoint (checkpoints/step-*/meta.json)".into(),
    })
}

/// Named tensors on the CPU, contiguous, in name order.
fn to_cpu(named: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        named.into_iter().map(|(n, t)| (n, t.detach().to_device(Device::Cpu).contiguous())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Each tensor copied into a fresh host buffer (a snapshot the training step cannot change:
/// on the CPU, `to_device` would hand back the live storage).
pub(crate) fn host_copies(named: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, TrainError> {
    named
        .into_iter()
        .map(|(n, t)| {
            let mut host = Tensor::empty(t.size(), (t.kind(), Device::Cpu));
            tch::no_grad(|| host.f_copy_(&t)).map_err(TrainError::torch(format!("copy {n} to the host")))?;
            Ok((n, host))
        })
        .collect()
}

/// Groups name-ordered tensors into files of at most `limit` bytes (a tensor larger than
/// that gets a file of its own).
fn shard_groups(tensors: Vec<(String, Tensor)>, limit: u64) -> Vec<Vec<(String, Tensor)>> {
    let mut groups: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, t) in tensors {
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        if size > 0 && size + bytes > limit {
            groups.push(Vec::new());
            size = 0;
        }
        size += bytes;
        if let Some(g) = groups.last_mut() {
            g.push((name, t));
        }
    }
    groups
}

/// Writes the weights into `dir`: one `model.safetensors`, or shards and their index when
/// they exceed `shard_mb` MB. Returns the files written.
fn write_model(dir: &Path, vars: Vec<(String, Tensor)>, shard_mb: f64) -> Result<Vec<PathBuf>, TrainError> {
    let torch_err = |p: &Path| {
        let p = p.to_path_buf();
        move |e: tch::TchError| TrainError::Checkpoint { path: p, msg: e.to_string() }
    };
    let vars = to_cpu(vars);
    let total: u64 = vars.iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum();
    let limit = (shard_mb * 1e6).max(1.0) as u64;
    if total <= limit {
        let path = dir.join(MODEL_FILE);
        Tensor::write_safetensors(&vars, &path).map_err(torch_err(&path))?;
        return Ok(vec![path]);
    }
    let groups = shard_groups(vars, limit);
    let n = groups.len();
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::with_capacity(n + 1);
    for (i, group) in groups.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for (t, _) in &group {
            weight_map.insert(t.clone(), name.clone());
        }
        let path = dir.join(&name);
        Tensor::write_safetensors(&group, &path).map_err(torch_err(&path))?;
        files.push(path);
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let path = dir.join(MODEL_INDEX);
    write_atomic(&path, &serde_json::to_vec_pretty(&index).unwrap_or_default())?;
    files.push(path);
    Ok(files)
}

/// A sharded checkpoint's index: its path, its `weight_map` (tensor → file) and the files it
/// names (sorted, each a plain name inside the folder); None for a one-file checkpoint.
type Index = (PathBuf, serde_json::Map<String, serde_json::Value>, Vec<String>);

pub(crate) fn read_index(ckpt: &Path) -> Result<Option<Index>, TrainError> {
    let index = ckpt.join(MODEL_INDEX);
    if !index.exists() {
        return Ok(None);
    }
    let bad = |msg: String| TrainError::Checkpoint { path: index.clone(), msg };
    let text = std::fs::read_to_string(&index).map_err(TrainError::io("read", &index))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = match v.get_mut("weight_map").map(serde_json::Value::take) {
        Some(serde_json::Value::Object(m)) => m,
        _ => return Err(bad("no weight_map object".into())),
    };
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str()).map(str::to_string).collect();
    files.sort_unstable();
    files.dedup();
    if let Some(f) = files.iter().find(|f| f.contains('/') || f.contains("..")) {
        return Err(bad(format!("shard file name {f:?} leaves the checkpoint folder")));
    }
    Ok(Some((index, map, files)))
}

/// Reads a checkpoint's weights, from `model.safetensors` or from the shards its index names.
pub fn read_model(ckpt: &Path) -> Result<BTreeMap<String, Tensor>, TrainError> {
    if Stored::is_per_rank(ckpt) {
        let stored = Stored::open(ckpt, false)?;
        return stored.names().map(|n| Ok((n.clone(), stored.read(n)?))).collect();
    }
    let Some((index, map, files)) = read_index(ckpt)? else {
        return read_tensors(&ckpt.join(MODEL_FILE));
    };
    let bad = |msg: String| TrainError::Checkpoint { path: index.clone(), msg };
    let mut out = BTreeMap::new();
    for f in &files {
        for (name, t) in read_tensors(&ckpt.join(f))? {
            if map.get(&name).and_then(|x| x.as_str()) != Some(f.as_str()) {
                return Err(bad(format!("{f} holds {name}, which the index places elsewhere")));
            }
            out.insert(name, t);
        }
    }
    for name in map.keys() {
        if !out.contains_key(name) {
            return Err(bad(format!("{name} is missing from its shard")));
        }
    }
    Ok(out)
}

/// Writes one checkpoint and prunes all but the newest `keep`, except `pinned` (a checkpoint
/// still being copied elsewhere: it goes at a later save).
pub fn save(
    run: &Path,
    vars: Vec<(String, Tensor)>,
    optimizer: Vec<(String, Tensor)>,
    meta: &Meta,
    keep: usize,
    shard_mb: f64,
    pinned: Option<&Path>,
) -> Result<PathBuf, TrainError> {
    let tmp = prepare(run, meta.step)?;
    let torch_err = |p: &Path| {
        let p = p.to_path_buf();
        move |e: tch::TchError| TrainError::Checkpoint { path: p, msg: e.to_string() }
    };
    let mut written = write_model(&tmp, vars, shard_mb)?;
    let opt_path = tmp.join(OPTIMIZER_FILE);
    Tensor::write_safetensors(&to_cpu(optimizer), &opt_path).map_err(torch_err(&opt_path))?;
    written.push(opt_path);
    for p in &written {
        std::fs::File::open(p).and_then(|f| f.sync_all()).map_err(TrainError::io("sync", p))?;
    }
    commit(run, meta, keep, pinned)
}

/// The temporary folder the checkpoint of `step` is written into (emptied, created).
pub fn prepare(run: &Path, step: u64) -> Result<PathBuf, TrainError> {
    let tmp = tmp_dir(run, step);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(TrainError::io("remove stale", &tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(TrainError::io("create", &tmp))?;
    Ok(tmp)
}

/// Where the checkpoint of `step` is written before it is complete.
pub fn tmp_dir(run: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run).join(format!(".tmp-{}", step_name(step)))
}

/// Completes the checkpoint whose tensors are in [`tmp_dir`]: writes `meta.json`, renames the
/// folder into place and prunes (see [`save`]).
pub fn commit(run: &Path, meta: &Meta, keep: usize, pinned: Option<&Path>) -> Result<PathBuf, TrainError> {
    let (tmp, final_dir) = (tmp_dir(run, meta.step), dir_of(run, meta.step));
    let meta_json = serde_json::to_vec_pretty(meta)
        .map_err(|e| TrainError::Checkpoint { path: tmp.join(META_FILE), msg: e.to_string() })?;
    write_atomic(&tmp.join(META_FILE), &meta_json)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(TrainError::io("replace", &final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(TrainError::io("rename", &final_dir))?;
    if let Ok(d) = std::fs::File::open(checkpoints_dir(run)) {
        let _ = d.sync_all();
    }
    prune(run, keep, pinned)?;
    Ok(final_dir)
}

/// What [`consolidate`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Consolidated {
    pub checkpoint: PathBuf,
    pub step: u64,
    pub out: PathBuf,
    /// Ranks that wrote the source (None: it was already whole).
    pub source_world: Option<usize>,
    pub files: Vec<PathBuf>,
    pub parameters: i64,
}

/// Writes checkpoint `ckpt` into the empty (or new) folder `out` in the whole-tensor format:
/// `model.safetensors` (split past `shard_mb` MB, with its index), `optimizer.safetensors`
/// and `meta.json` — a per-rank checkpoint consolidated, as torch's `dcp_to_torch_save`
/// does. The result reads with any safetensors tool and resumes like any checkpoint. Holds
/// the whole model and its moments in host memory.
pub fn consolidate(ckpt: &Path, out: &Path, shard_mb: f64) -> Result<Consolidated, TrainError> {
    let meta = read_meta(ckpt)?;
    if out.join(META_FILE).exists() || std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(TrainError::Checkpoint { path: out.to_path_buf(), msg: "is not empty".into() });
    }
    std::fs::create_dir_all(out).map_err(TrainError::io("create", out))?;
    let stored = Stored::open(ckpt, true)?;
    let (mut weights, mut moments) = (Vec::new(), Vec::new());
    for name in stored.names() {
        let t = stored.read(name)?;
        if crate::per_rank::is_moment(name) { moments.push((name.clone(), t)) } else { weights.push((name.clone(), t)) }
    }
    let parameters = stored.weight_elements();
    let mut files = write_model(out, weights, shard_mb)?;
    let opt_path = out.join(OPTIMIZER_FILE);
    Tensor::write_safetensors(&to_cpu(moments), &opt_path)
        .map_err(|e| TrainError::Checkpoint { path: opt_path.clone(), msg: e.to_string() })?;
    files.push(opt_path);
    let meta_json = serde_json::to_vec_pretty(&meta)
        .map_err(|e| TrainError::Checkpoint { path: out.join(META_FILE), msg: e.to_string() })?;
    // Last: the folder is a checkpoint once its meta.json is there.
    write_atomic(&out.join(META_FILE), &meta_json)?;
    files.push(out.join(META_FILE));
    Ok(Consolidated {
        checkpoint: ckpt.to_path_buf(),
        step: meta.step,
        out: out.to_path_buf(),
        source_world: stored.world(),
        files,
        parameters,
    })
}

/// Deletes all but the newest `keep` checkpoints, except `pinned`.
pub fn prune(run: &Path, keep: usize, pinned: Option<&Path>) -> Result<(), TrainError> {
    let all = list(run)?;
    if all.len() > keep.max(1) {
        for (_, old) in all[..all.len() - keep.max(1)].iter().filter(|(_, p)| Some(p.as_path()) != pinned) {
            std::fs::remove_dir_all(old).map_err(TrainError::io("prune", old))?;
        }
    }
    Ok(())
}

pub fn read_meta(ckpt: &Path) -> Result<Meta, TrainError> {
    let p = ckpt.join(META_FILE);
    let text = std::fs::read_to_string(&p).map_err(TrainError::io("read", &p))?;
    let meta: Meta =
        serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint { path: p.clone(), msg: e.to_string() })?;
    if meta.version != META_VERSION {
        return Err(TrainError::Checkpoint {
            path: p,
            msg: format!("meta version {} (this build reads {META_VERSION})", meta.version),
        });
    }
    check_counters(&meta).map_err(|msg| TrainError::Checkpoint { path: p.clone(), msg })?;
    // The config builds the model before the weights are read: one edited or copied from
    // another run must not allocate what the weights do not hold (a vocab_size of 2^32 asked
    // tch for 550 GB and panicked). Its parameter count must be the stored one.
    meta.config.model.validate().map_err(|e| TrainError::Checkpoint { path: p.clone(), msg: e.to_string() })?;
    let stored = stored_params(ckpt)?;
    let described = meta.config.model.param_count();
    if stored != described {
        return Err(TrainError::Checkpoint {
            path: p,
            msg: format!(
                "its config describes {described} parameters but {} holds {stored} (config and weights are from different models)",
                model_path(ckpt).display()
            ),
        });
    }
    Ok(meta)
}

/// What every checkpoint keeps true of its counters. The run increments them after a resume,
/// so an edited 2^64-1 would overflow, and an optimizer step count past the run's steps (or
/// below 0) gives AdamW a bias correction no run had.
fn check_counters(meta: &Meta) -> Result<(), String> {
    const MAX_COUNT: u64 = 1 << 53;
    for (name, v) in [("step", meta.step), ("skipped", meta.skipped), ("tokens", meta.tokens)] {
        if v > MAX_COUNT {
            return Err(format!("{name} is {v}, past 2^53: not a checkpoint a run wrote"));
        }
    }
    if meta.skipped > meta.step || meta.skipped_in_a_row > meta.skipped {
        return Err(format!(
            "skipped_in_a_row {} <= skipped {} <= step {} does not hold",
            meta.skipped_in_a_row, meta.skipped, meta.step
        ));
    }
    match meta.optimizer_steps.iter().find(|&(_, &s)| s < 0 || s as u64 > meta.step) {
        Some((name, s)) => Err(format!("optimizer_steps of {name} is {s}, outside 0..={} (the run's step)", meta.step)),
        None => Ok(()),
    }
}

/// Elements of a checkpoint's weights (one file or the shards its index names), from the
/// safetensors headers alone.
pub fn stored_params(ckpt: &Path) -> Result<i64, TrainError> {
    if Stored::is_per_rank(ckpt) {
        return Ok(Stored::open(ckpt, false)?.weight_elements());
    }
    let files: Vec<PathBuf> = match read_index(ckpt)? {
        Some((_, _, files)) => files.into_iter().map(|f| ckpt.join(f)).collect(),
        None => vec![ckpt.join(MODEL_FILE)],
    };
    let mut total: i64 = 0;
    for f in files {
        let bad = |msg: String| TrainError::Checkpoint { path: f.clone(), msg };
        let mut file = std::fs::File::open(&f).map_err(TrainError::io("open", &f))?;
        let len = file.metadata().map_err(TrainError::io("stat", &f))?.len();
        let mut head = [0u8; 8];
        if len < 8 {
            return Err(bad(format!("{len} bytes, shorter than a safetensors header")));
        }
        std::io::Read::read_exact(&mut file, &mut head).map_err(TrainError::io("read", &f))?;
        let n = u64::from_le_bytes(head);
        // safetensors caps its header at 100 MB.
        if n > 100_000_000 || n > len - 8 {
            return Err(bad(format!("safetensors header of {n} bytes in a file of {len}")));
        }
        let mut json = vec![0u8; n as usize];
        std::io::Read::read_exact(&mut file, &mut json).map_err(TrainError::io("read", &f))?;
        // The header alone, in safetensors' own schema (its `SafeTensors` parser wants the
        // whole file in memory).
        let header: safetensors::tensor::Metadata =
            serde_json::from_slice(&json).map_err(|e| bad(format!("not a safetensors header: {e}")))?;
        for (name, info) in header.tensors() {
            let n = info.shape.iter().try_fold(1i64, |a, &d| i64::try_from(d).ok().and_then(|d| a.checked_mul(d)));
            total =
                n.and_then(|n| total.checked_add(n)).ok_or_else(|| bad(format!("tensor {name}: size overflows")))?;
        }
    }
    Ok(total)
}

/// Reads a safetensors file into a name → tensor map.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, TrainError> {
    if !path.exists() {
        return Err(TrainError::Checkpoint { path: path.to_path_buf(), msg: "missing".into() });
    }
    let v = Tensor::read_safetensors(path)
        .map_err(|e| TrainError::Checkpoint { path: path.to_path_buf(), msg: e.to_string() })?;
    Ok(v.into_iter().collect())
}

/// Copies the checkpoint's weights (one file or shards) into the VarStore; names and shapes
/// must match exactly. Names are the per-tower ones of [`public_parameters`], whatever the
/// VarStore's storage layout.
pub fn load_weights(vs: &nn::VarStore, ckpt: &Path) -> Result<(), TrainError> {
    let saved = read_model(ckpt)?;
    let vars = public_parameters(vs);
    let names: std::collections::BTreeSet<String> = vars.iter().map(|(n, _)| n.clone()).collect();
    check_unexpected(&saved, &names, ckpt)?;
    copy_weights(&saved, vars, ckpt)
}

/// The model file of checkpoint `ckpt` (the index when sharded), for errors.
fn model_path(ckpt: &Path) -> PathBuf {
    if Stored::is_per_rank(ckpt) {
        return ckpt.join(crate::per_rank::INDEX_FILE);
    }
    if ckpt.join(MODEL_INDEX).exists() { ckpt.join(MODEL_INDEX) } else { ckpt.join(MODEL_FILE) }
}

/// A saved tensor the model has no place for is an error (config and checkpoint disagree).
pub fn check_unexpected(
    saved: &BTreeMap<String, Tensor>,
    names: &std::collections::BTreeSet<String>,
    ckpt: &Path,
) -> Result<(), TrainError> {
    match saved.keys().find(|n| !names.contains(*n)) {
        Some(name) => Err(TrainError::Checkpoint {
            path: model_path(ckpt),
            msg: format!("unexpected tensor {name} (config and checkpoint disagree)"),
        }),
        None => Ok(()),
    }
}

/// Copies the saved tensors into `vars` (public names: the model's variables or views of
/// them), each present with its shape.
pub fn copy_weights(
    saved: &BTreeMap<String, Tensor>,
    vars: Vec<(String, Tensor)>,
    ckpt: &Path,
) -> Result<(), TrainError> {
    let path = model_path(ckpt);
    let bad = |msg: String| TrainError::Checkpoint { path: path.clone(), msg };
    tch::no_grad(|| {
        for (name, mut var) in vars {
            let src = saved.get(&name).ok_or_else(|| bad(format!("missing tensor {name}")))?;
            if src.size() != var.size() {
                return Err(bad(format!("{name} has shape {:?}, the model needs {:?}", src.size(), var.size())));
            }
            check_values(&name, src, false).map_err(bad)?;
            var.f_copy_(src).map_err(|e| bad(format!("{name}: {e}")))?;
        }
        Ok(())
    })
}

/// A stored weight or moment must be floating point (an integer tensor would be truncated
/// into the model silently) and finite (a NaN one surfaces steps later as a NaN loss that
/// names no file); `non_negative` for AdamW's second moments, whose square root is taken.
pub(crate) fn check_values(name: &str, t: &Tensor, non_negative: bool) -> Result<(), String> {
    let torch = |e: tch::TchError| format!("{name}: {e}");
    if !t.f_is_floating_point().map_err(torch)? {
        return Err(format!("{name} is {:?}, not floating point", t.kind()));
    }
    let ok = |t: Tensor| -> Result<bool, String> { bool::try_from(&t.f_all().map_err(torch)?).map_err(torch) };
    if !ok(t.f_isfinite().map_err(torch)?)? {
        return Err(format!("{name} holds NaN or infinity"));
    }
    if non_negative && !ok(t.f_ge(0.0).map_err(torch)?)? {
        return Err(format!("{name} holds negative values (a second moment is a mean of squares)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, Tensor)> {
        (0..5).map(|i| (format!("w{i}"), Tensor::from_slice(&vec![i as f32; 100]).view([10, 10]))).collect()
    }

    /// An async checkpoint writes from host copies that later in-place updates (AdamW's) do not
    /// reach: on the CPU `to_device` would hand back the live storage.
    #[test]
    fn host_copies_do_not_share_storage() {
        let live = tensors();
        let copies = host_copies(live.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()).expect("copies");
        for (_, t) in &live {
            let mut t = t.shallow_clone();
            let _ = t.f_add_scalar_(1.0).expect("in place");
        }
        for ((_, c), i) in copies.iter().zip(0..) {
            assert_eq!(c.double_value(&[3, 3]), f64::from(i), "the copy changed with the live tensor");
        }
    }

    #[test]
    fn tokenizer_snapshot_keeps_same_bytes_and_skips_unsafe_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, run) = (dir.path().join("src"), dir.path().join("run"));
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::write(src.join("vq.safetensors"), b"codes").expect("write");
        let files = vec![
            ("image".to_string(), src.join("vq.safetensors")),
            ("../escape".to_string(), src.join("vq.safetensors")),
        ];
        let kept = snapshot_tokenizers(&run, &files).expect("snapshot");
        assert_eq!(kept, vec![run.join("tokenizers/image.safetensors")]);
        assert!(!dir.path().join("escape.safetensors").exists());
        // A copy with the same bytes (a file system without hard links) is kept as it is.
        std::fs::remove_file(&kept[0]).expect("rm");
        std::fs::copy(src.join("vq.safetensors"), &kept[0]).expect("copy");
        let inode = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&kept[0]).expect("stat"));
        let before = inode();
        snapshot_tokenizers(&run, &files).expect("again");
        assert_eq!(inode(), before);
        // New bytes replace it.
        std::fs::remove_file(src.join("vq.safetensors")).expect("rm");
        std::fs::write(src.join("vq.safetensors"), b"other").expect("write");
        snapshot_tokenizers(&run, &files).expect("third");
        assert_eq!(std::fs::read(&kept[0]).expect("read"), b"other");
        assert!(snapshot_tokenizers(&run, &[("text".into(), src.join("missing.json"))]).is_err());
        // No tokenizers (synthetic data): the folder goes, so nothing promises any.
        assert_eq!(snapshot_tokenizers(&run, &[]).expect("none"), Vec::<PathBuf>::new());
        assert!(!run.join(TOKENIZERS_DIR).exists());
    }

    #[test]
    fn large_models_are_sharded_with_an_index_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 400 bytes per tensor, 1000-byte shards: two tensors a file.
        let files = write_model(dir.path(), tensors(), 0.001).expect("write");
        let names: Vec<String> =
            files.iter().map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                MODEL_INDEX
            ]
        );
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(MODEL_INDEX)).expect("index")).expect("json");
        assert_eq!(index["metadata"]["total_size"], 2000);
        assert_eq!(index["weight_map"]["w4"], "model-00003-of-00003.safetensors");
        let back = read_model(dir.path()).expect("read");
        assert_eq!(back.len(), 5);
        // 5 tensors of 100 floats, counted from the headers alone.
        assert_eq!(stored_params(dir.path()).expect("count"), 500);
        assert!(back["w3"].equal(&tensors()[3].1));
        // Small models stay one file.
        let one = tempfile::tempdir().expect("tempdir");
        assert_eq!(write_model(one.path(), tensors(), 1.0).expect("write").len(), 1);
        assert_eq!(read_model(one.path()).expect("read").len(), 5);
        assert_eq!(stored_params(one.path()).expect("count"), 500);
        // A shard the index names but which is gone is an error naming it.
        std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).expect("rm");
        let e = read_model(dir.path()).expect_err("missing shard");
        assert!(e.to_string().contains("model-00002-of-00003.safetensors"), "{e}");
    }
}
