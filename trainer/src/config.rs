//! Training configuration: TOML with unknown keys rejected, named presets, `key=value` overrides.
//!
//! A run's config is resolved once (preset → file → overrides → vocabulary from the corpus)
//! and written into the run directory; resume and eval read it back from there.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dist::Backend;
use crate::error::TrainError;
use crate::model::{Arch, ModelConfig, Routing};

/// Where batches come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Shard corpus directories, mixed by `weights` (empty weights = equal).
    pub paths: Vec<PathBuf>,
    /// The object-store location each of `paths` is the local cache of (`""` for a corpus
    /// on disk), so that a resume on another machine fetches it again there. Empty: all on disk.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<String>,
    pub weights: Vec<f64>,
    /// Use the built-in synthetic documents instead of a corpus (tests, smoke runs).
    pub synthetic: bool,
    pub seq_len: usize,
    /// Rows per micro-batch on each rank.
    pub batch_size: usize,
    /// Fraction of documents held out for evaluation (0 disables evaluation).
    pub eval_fraction: f64,
    pub split_segments: bool,
    /// Batches the loader prepares ahead on its own thread.
    pub prefetch: usize,
    /// Document order within an epoch: "block" (shards permuted, documents shuffled inside
    /// windows; zstd shards decode each chunk about once) or "documents" (one global shuffle).
    pub shuffle: motley_shards::Shuffle,
    /// Documents per block-shuffle window (0: as many as hold 64 MiB of decoded payload).
    pub shuffle_window: u64,
    /// Where the per-epoch row indexes of multi-rank runs go (empty: beside each corpus, or
    /// the cache directory when that is read-only).
    pub index_dir: Option<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            paths: Vec::new(),
            origins: Vec::new(),
            weights: Vec::new(),
            synthetic: false,
            seq_len: 256,
            batch_size: 8,
            eval_fraction: 0.05,
            split_segments: false,
            prefetch: 2,
            shuffle: motley_shards::Shuffle::Block,
            shuffle_window: 0,
            index_dir: None,
        }
    }
}

/// AdamW and the learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    /// Floor of the cosine decay.
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay on matrices (never on norms or embeddings).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f64,
    /// Micro-batches per optimizer step (derived from `global_batch` when that is set).
    pub grad_accum: u64,
    /// Rows per optimizer step over all ranks and micro-batches (Megatron's global batch).
    /// 0: `data.batch_size × grad_accum × world size`, resolved at start. When set,
    /// `grad_accum = global_batch / (batch_size × world size)`, so resuming on another number
    /// of ranks keeps the same optimization.
    pub global_batch: u64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 3e-4,
            min_lr: 1.5e-5,
            warmup_steps: 4000,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            grad_accum: 1,
            global_batch: 0,
        }
    }
}

/// Which blocks recompute their activations in backward instead of keeping them:
/// `train.activation_checkpointing = true` (every block), `false`, or `k` (every k-th).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Checkpointing {
    All(bool),
    Every(u64),
}

impl Default for Checkpointing {
    fn default() -> Self {
        Checkpointing::All(false)
    }
}

impl Checkpointing {
    /// Checkpoint blocks `0, k, 2k, …`; 0 = none.
    pub fn every(self) -> usize {
        match self {
            Checkpointing::All(on) => usize::from(on),
            Checkpointing::Every(k) => k as usize,
        }
    }
}

/// What to do when a step's loss or gradient norm is NaN or inf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// End training with an error (the last checkpoint stays as it was).
    Stop,
    /// Drop the step's update, count it, and stop after `max_skipped` in a row.
    Skip,
}

/// How a checkpoint's tensors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointFormat {
    /// Whole tensors under their public names (Hugging Face's layout): under ZeRO rank 0
    /// gathers the model and moments and writes them alone.
    #[default]
    Full,
    /// Every rank writes its own chunk of the flat weights and moments (no gather; all ranks
    /// write at once) beside a `ranks.json` index; any world size resumes from it, and eval,
    /// sample and export read it. The run directory must be one folder every node sees, or
    /// an object store (`--out s3://…`), to which each rank copies its own files.
    PerRank,
}

/// The loop: length, cadence, checkpoints, device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopConfig {
    /// Optimizer steps in total (the cosine schedule ends here).
    pub steps: u64,
    pub seed: u64,
    pub routing: Routing,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Console line and plot refresh every N steps (metrics.jsonl gets every step).
    pub log_every: u64,
    /// Held-out evaluation every N steps (0 = only at the end).
    pub eval_every: u64,
    /// Held-out batches per evaluation, each `optim.global_batch` rows (split over the ranks and
    /// micro-batches as training is), so every evaluation sees the same rows on any world size.
    pub eval_batches: u64,
    /// Checkpoint every N steps (0 = only at the end).
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// Split the weights into files of at most this many MB with an HF-style index (5 GB, as
    /// `save_pretrained`'s default).
    pub checkpoint_shard_mb: f64,
    /// Write each checkpoint on a background thread from a host copy of the weights and
    /// moments taken at the step (torchtitan's async checkpointing): training goes on while
    /// the files are written, fsynced and renamed; one write at a time. Host memory: that
    /// copy (on CUDA the synchronous path copies to the host too; on the CPU it is extra).
    pub checkpoint_async: bool,
    /// `full` (whole tensors, rank 0 writes) or `per_rank` (each rank its chunk; see
    /// [`CheckpointFormat`]).
    pub checkpoint_format: CheckpointFormat,
    pub on_nonfinite: OnNonFinite,
    pub max_skipped: u64,
    /// Peak dense bf16 TFLOP/s of one accelerator, for model FLOPs utilization (H100/H200: 989).
    pub peak_tflops: f64,
    /// CPU threads for torch (0 = torch's default for one process; with several ranks on a
    /// machine and no OMP_NUM_THREADS, its cores divided among them).
    pub threads: i32,
    /// Data parallel: `auto` (Gloo on CPU, NCCL on CUDA), `gloo` or `nccl`.
    pub dist_backend: Backend,
    /// Seconds a collective or the rendezvous may take before a rank gives up, and how long a
    /// rank may go silent before the others end the job naming it.
    pub dist_timeout_s: f64,
    /// ZeRO stage: 0 (every rank keeps all optimizer state), 1 (AdamW moments sharded over
    /// ranks: gradients reduce-scattered, parameters all-gathered) or 3 (parameters, gradients
    /// and moments sharded: each block's weights gathered just before it runs and freed after,
    /// as FSDP's full shard; needs `activation_checkpointing = true`).
    pub zero: u8,
    /// Gradient bucket size in MiB (torch DDP's 25; the first bucket 1 MiB).
    pub bucket_mb: f64,
    /// End the run after this step (0: at `steps`), checkpointing it, as a preempted job would:
    /// the schedule still spans `steps`, and `--resume` continues.
    pub stop_at: u64,
    /// At the end of a data-parallel run, check that every rank holds bit-identical weights
    /// (blake3 of the parameters, compared through the store; costs a copy to the host).
    pub verify_replicas: bool,
    /// Recompute block activations in backward instead of keeping them: `true`, `false` or
    /// every k-th block (dense and MoT; MoE blocks always keep theirs).
    pub activation_checkpointing: Checkpointing,
    /// Write the global row ids every rank trains on to `RUN/rows/rank-N.jsonl` (audits that
    /// every row is consumed exactly once, across resumes on other world sizes).
    pub log_rows: bool,
    /// Memory of one device (`80GB`, `40GiB`): a run the memory plan (`motley plan`) says cannot
    /// fit is refused at start, naming the settings that would fit. Empty: on the CPU the
    /// machine's physical memory shared by its ranks, on CUDA no check.
    pub device_memory: String,
    /// Record steps `[first, last]` (as numbered in the log, inclusive) with torch's profiler:
    /// every rank writes `RUN/profile/steps-FIRST-LAST/rank-R.pt.trace.json`, and rank 0 prints
    /// the operators by self time. Empty: off.
    pub profile_steps: Vec<u64>,
    /// Rank 0 also writes each step's scalars as TensorBoard events to `RUN/tensorboard/`
    /// (`tensorboard --logdir runs/`).
    pub tensorboard: bool,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            steps: 1000,
            seed: 0,
            routing: Routing::Sorted,
            device: "auto".into(),
            log_every: 10,
            eval_every: 100,
            eval_batches: 4,
            checkpoint_every: 500,
            keep_checkpoints: 2,
            checkpoint_shard_mb: 5000.0,
            checkpoint_async: false,
            checkpoint_format: CheckpointFormat::Full,
            on_nonfinite: OnNonFinite::Stop,
            max_skipped: 10,
            peak_tflops: 989.0,
            threads: 0,
            dist_backend: Backend::Auto,
            dist_timeout_s: 600.0,
            zero: 0,
            bucket_mb: 25.0,
            stop_at: 0,
            verify_replicas: false,
            activation_checkpointing: Checkpointing::default(),
            log_rows: false,
            device_memory: String::new(),
            profile_steps: Vec::new(),
            tensorboard: false,
        }
    }
}

/// A whole run's configuration; serialized as TOML with `[model]`, `[data]`, `[optim]`, `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Name of the preset the config started from (informational).
    #[serde(default)]
    pub preset: String,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub train: LoopConfig,
}

/// Names accepted by [`TrainConfig::preset`].
pub const PRESETS: [&str; 10] = [
    "tiny",
    "37m",
    "94m",
    "443m",
    "1.5b",
    "7b",
    "transfusion-163m",
    "transfusion-760m",
    "transfusion-1.4b",
    "transfusion-7b",
];

impl TrainConfig {
    /// A named preset: `tiny` (CPU in minutes on the sample corpus), the paper's Chameleon
    /// sizes (Table 1: d_model, layers, heads; seq 4096; AdamW 3e-4, warmup 4000, cosine to
    /// 1.5e-5) or its Transfusion sizes (`transfusion-*`: the same schedule, llama pre-norm,
    /// `L = L_LM + 5·L_DDPM` over a corpus of latent image patches).
    pub fn preset(name: &str) -> Result<Self, TrainError> {
        let chameleon = |d: i64, l: i64, h: i64| TrainConfig {
            preset: name.to_string(),
            model: ModelConfig { d_model: d, n_layers: l, n_heads: h, ..ModelConfig::default() },
            data: DataConfig { seq_len: 4096, batch_size: 8, ..DataConfig::default() },
            optim: OptimConfig::default(),
            train: LoopConfig { steps: 100_000, eval_every: 1000, checkpoint_every: 2000, ..LoopConfig::default() },
        };
        Ok(match name {
            "tiny" => TrainConfig {
                preset: name.to_string(),
                model: ModelConfig {
                    d_model: 128,
                    n_layers: 4,
                    n_heads: 4,
                    ffn_multiple_of: 32,
                    ..ModelConfig::default()
                },
                data: DataConfig { seq_len: 256, batch_size: 8, ..DataConfig::default() },
                optim: OptimConfig { lr: 3e-3, min_lr: 3e-4, warmup_steps: 20, ..OptimConfig::default() },
                train: LoopConfig {
                    steps: 200,
                    log_every: 10,
                    eval_every: 50,
                    eval_batches: 4,
                    checkpoint_every: 100,
                    ..LoopConfig::default()
                },
            },
            "37m" => chameleon(256, 4, 8),
            "94m" => chameleon(512, 8, 8),
            "443m" => chameleon(1024, 24, 16),
            "1.5b" => chameleon(2048, 24, 16),
            "7b" => chameleon(4096, 32, 32),
            // Transfusion's sizes (Zhou et al. 2024, Table 1, as the MoT paper trains them).
            "transfusion-163m" => chameleon(768, 16, 12),
            "transfusion-760m" => chameleon(1536, 24, 24),
            "transfusion-1.4b" => chameleon(2048, 24, 16),
            "transfusion-7b" => chameleon(4096, 32, 32),
            other => {
                return Err(TrainError::Config {
                    path: "preset".into(),
                    msg: format!("unknown preset `{other}` (known: {})", PRESETS.join(", ")),
                });
            }
        })
    }

    /// Preset `preset`, the TOML file `config` laid over it, then `overrides` (`key=value`):
    /// the order every command that takes a config resolves it in.
    pub fn layered(preset: &str, config: Option<&Path>, overrides: &[String]) -> Result<Self, TrainError> {
        let mut cfg = Self::preset(preset)?;
        if let Some(path) = config {
            cfg = cfg.merge_file(path)?;
        }
        cfg.apply_overrides(overrides)
    }

    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, TrainError> {
        toml::from_str(text).map_err(|e| TrainError::Config { path: origin.to_string(), msg: e.to_string() })
    }

    pub fn load(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(TrainError::io("read config", path))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// This config with the keys of the TOML file at `path` laid over it, key by key
    /// (a file naming only `[model] d_model = 512` keeps everything else).
    pub fn merge_file(&self, path: &Path) -> Result<Self, TrainError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(TrainError::io("read config", path))?;
        let err = |msg: String| TrainError::Config { path: origin.clone(), msg };
        let over: toml::Value = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let mut doc = toml::Value::try_from(self).map_err(|e| err(e.to_string()))?;
        merge_toml(&mut doc, over);
        let merged = toml::to_string(&doc).map_err(|e| err(e.to_string()))?;
        Self::from_toml_str(&merged, &origin)
    }

    pub fn to_toml(&self) -> Result<String, TrainError> {
        toml::to_string_pretty(self).map_err(|e| TrainError::Config { path: "<resolved>".into(), msg: e.to_string() })
    }

    /// Applies `section.key=value` overrides (`model.d_model=256`, `train.steps=50`,
    /// `data.paths=["a","b"]`). Values parse as TOML, falling back to a bare string; the
    /// result is re-checked against the schema, so a misspelt key is an error.
    pub fn apply_overrides(&self, overrides: &[String]) -> Result<Self, TrainError> {
        if overrides.is_empty() {
            return Ok(self.clone());
        }
        let err = |path: &str, msg: String| TrainError::Config { path: path.to_string(), msg };
        let mut doc = toml::Value::try_from(self).map_err(|e| err("<config>", e.to_string()))?;
        for o in overrides {
            let (key, raw) = o.split_once('=').ok_or_else(|| err(o, "expected key=value".into()))?;
            let key = key.trim();
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
            let parts: Vec<&str> = key.split('.').collect();
            let (last, parents) = parts.split_last().ok_or_else(|| err(key, "empty key".into()))?;
            let mut cur = &mut doc;
            for p in parents {
                cur = cur
                    .as_table_mut()
                    .and_then(|t| t.get_mut(*p))
                    .ok_or_else(|| err(key, format!("no section `{p}`")))?;
            }
            let table = cur.as_table_mut().ok_or_else(|| err(key, "not a section".into()))?;
            // A key may be absent from the serialized config (empty lists are skipped, as
            // `data.origins` is) and still be one: the schema, not the table, decides.
            let present = table.contains_key(*last);
            table.insert((*last).to_string(), value);
            // Checked key by key, so a bad value is named by its key (the whole document's
            // error would point at a line of motley's own re-serialized TOML).
            if let Err(e) = doc.clone().try_into::<TrainConfig>() {
                if !present {
                    return Err(err(key, format!("unknown key `{last}`")));
                }
                return Err(err(key, format!("{}: {}", raw.trim(), e.message().trim())));
            }
        }
        let text = toml::to_string(&doc).map_err(|e| err("<config>", e.to_string()))?;
        Self::from_toml_str(&text, "--set overrides")
    }

    /// How `fresh` (a command's config) differs from this one (a run's saved config), key by
    /// flattened key (`train.steps`): `[train]` keys as `key=value` overrides a resume applies;
    /// any other key (but `preset` and the data's paths, origins and loader tuning, which a
    /// resume may change, and the keys the run resolved at its start where `fresh` leaves them
    /// 0) as a conflict `key: saved there, fresh here`, since the run's checkpoint cannot
    /// continue as that config.
    pub fn resume_delta(&self, fresh: &TrainConfig) -> Result<(Vec<String>, Vec<String>), TrainError> {
        fn flat(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                        flat(&key, v, out);
                    }
                }
                v => {
                    out.insert(prefix.to_string(), v.clone());
                }
            }
        }
        let table = |c: &TrainConfig| -> Result<BTreeMap<String, toml::Value>, TrainError> {
            let v = toml::Value::try_from(c)
                .map_err(|e| TrainError::Config { path: "config".into(), msg: e.to_string() })?;
            let mut m = BTreeMap::new();
            flat("", &v, &mut m);
            Ok(m)
        };
        let (a, b) = (table(self)?, table(fresh)?);
        // `grad_accum` follows the run's global batch on any world size, as on `--resume`.
        let free = ["preset", "data.paths", "data.origins", "data.prefetch", "data.index_dir", "optim.grad_accum"];
        // Set from the corpus or the launch when the run started: 0 here means "as then".
        let resolved = ["model.vocab_size", "model.latent_dim", "model.latent_scale", "optim.global_batch"];
        let zero = |v: Option<&toml::Value>| {
            matches!(v, Some(toml::Value::Integer(0))) || v.and_then(|v| v.as_float()) == Some(0.0)
        };
        let (mut sets, mut conflicts) = (Vec::new(), Vec::new());
        for key in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
            let (x, y) = (a.get(key), b.get(key));
            if x == y || free.contains(&key.as_str()) || (resolved.contains(&key.as_str()) && zero(y)) {
                continue;
            }
            match (key.starts_with("train."), y) {
                (true, Some(y)) => sets.push(format!("{key}={y}")),
                _ => conflicts.push(format!(
                    "{key}: {} there, {} here",
                    x.map_or("unset".into(), ToString::to_string),
                    y.map_or("unset".into(), ToString::to_string)
                )),
            }
        }
        Ok((sets, conflicts))
    }

    /// Checks the parts that do not depend on the corpus.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |path: &str, msg: String| Err(TrainError::Config { path: path.into(), msg });
        self.model.check_settings()?;
        if self.data.seq_len < 2 || self.data.batch_size < 1 {
            return bad("data", "seq_len must be >= 2 and batch_size >= 1".into());
        }
        // Caps far past real runs, so a typo is this message rather than an allocation abort.
        for (name, v, max) in [
            ("data.batch_size", self.data.batch_size as u64, 1 << 20),
            ("data.prefetch", self.data.prefetch as u64, 256),
            ("optim.grad_accum", self.optim.grad_accum, 1 << 20),
            ("optim.global_batch", self.optim.global_batch, 1 << 30),
        ] {
            if v > max {
                return bad(name, format!("{v} is larger than {max}"));
            }
        }
        if let [first, last] = self.train.profile_steps[..] {
            if first == 0 || first > last {
                return bad(
                    "train.profile_steps",
                    format!("[{first}, {last}]: steps are numbered from 1, first <= last"),
                );
            }
        } else if !self.train.profile_steps.is_empty() {
            return bad("train.profile_steps", "[first, last] (two step numbers) or [] (off)".into());
        }
        if !self.data.synthetic && self.data.paths.is_empty() {
            return bad("data.paths", "no corpus given (use --data DIR)".into());
        }
        if !self.data.origins.is_empty() && self.data.origins.len() != self.data.paths.len() {
            return bad(
                "data.origins",
                format!("{} origins for {} paths", self.data.origins.len(), self.data.paths.len()),
            );
        }
        if !self.data.weights.is_empty() && self.data.weights.len() != self.data.paths.len() {
            return bad(
                "data.weights",
                format!("{} weights for {} paths", self.data.weights.len(), self.data.paths.len()),
            );
        }
        if !(0.0..1.0).contains(&self.data.eval_fraction) {
            return bad("data.eval_fraction", format!("{} is not in [0, 1)", self.data.eval_fraction));
        }
        if self.optim.grad_accum < 1 || self.train.steps < 1 {
            return bad("optim.grad_accum / train.steps", "must be >= 1".into());
        }
        let o = &self.optim;
        if !(o.lr > 0.0 && o.lr.is_finite() && o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            return bad("optim.lr", format!("need 0 <= min_lr ({}) <= lr ({}), finite", o.min_lr, o.lr));
        }
        if !((0.0..1.0).contains(&o.beta1) && (0.0..1.0).contains(&o.beta2)) {
            return bad("optim.beta1 / optim.beta2", format!("{} and {} must be in [0, 1)", o.beta1, o.beta2));
        }
        if !(o.eps > 0.0 && o.eps.is_finite()) {
            return bad("optim.eps", format!("{} must be finite and > 0", o.eps));
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return bad("optim.weight_decay", format!("{} must be finite and >= 0", o.weight_decay));
        }
        if !(o.grad_clip >= 0.0) {
            return bad("optim.grad_clip", format!("{} must be >= 0 (0: off)", o.grad_clip));
        }
        let t = &self.train;
        if !(t.checkpoint_shard_mb > 0.0 && t.checkpoint_shard_mb.is_finite()) {
            return bad("train.checkpoint_shard_mb", format!("{} must be finite and > 0", t.checkpoint_shard_mb));
        }
        if !(t.peak_tflops > 0.0 && t.peak_tflops.is_finite()) {
            return bad("train.peak_tflops", format!("{} must be finite and > 0", t.peak_tflops));
        }
        if !matches!(self.train.zero, 0 | 1 | 3) {
            return bad(
                "train.zero",
                format!(
                    "{} is not supported: 0 (replicated optimizer state), 1 (sharded moments) or 3 (sharded \
                     parameters, gradients and moments)",
                    self.train.zero
                ),
            );
        }
        if self.train.zero == 3 && self.train.activation_checkpointing.every() != 1 {
            return bad(
                "train.zero",
                "ZeRO-3 gathers a block's weights again in backward by recomputing the block: set \
                 train.activation_checkpointing = true (every block)"
                    .into(),
            );
        }
        if self.train.activation_checkpointing.every() > 0 && self.model.arch == Arch::Moe {
            return bad(
                "train.activation_checkpointing",
                "MoE blocks return their load-balancing loss beside the output and are not checkpointed; \
                 use dense or MoT, or turn it off"
                    .into(),
            );
        }
        if !self.train.device_memory.is_empty() && crate::plan::parse_bytes(&self.train.device_memory).is_none() {
            return bad("train.device_memory", format!("{:?}: expected a size such as 80GB", self.train.device_memory));
        }
        // A timeout past a year overflows the socket timeouts it becomes.
        if !(t.dist_timeout_s > 0.0 && t.dist_timeout_s <= 3.2e7 && t.bucket_mb > 0.0 && t.bucket_mb.is_finite()) {
            return bad(
                "train.dist_timeout_s / train.bucket_mb",
                format!(
                    "{} s and {} MiB: both must be > 0 and finite (the timeout at most a year)",
                    t.dist_timeout_s, t.bucket_mb
                ),
            );
        }
        Ok(())
    }

    /// Resolves the global batch for `world` ranks: sets `global_batch` when it is 0, else
    /// derives `grad_accum` from it (it must divide evenly).
    pub fn resolve_global_batch(&mut self, world: usize) -> Result<(), TrainError> {
        let per_micro = (self.data.batch_size * world) as u64;
        if self.optim.global_batch == 0 {
            self.optim.global_batch = per_micro * self.optim.grad_accum;
            return Ok(());
        }
        let g = self.optim.global_batch;
        if !g.is_multiple_of(per_micro) {
            return Err(TrainError::Config {
                path: "optim.global_batch".into(),
                msg: format!(
                    "{g} rows per step is not a multiple of data.batch_size {} × {world} ranks; choose a \
                     batch_size that divides {}",
                    self.data.batch_size,
                    g / world.max(1) as u64
                ),
            });
        }
        self.optim.grad_accum = g / per_micro;
        Ok(())
    }

    /// Short label: `mot`, `dense`, `moe`.
    pub fn arch(&self) -> Arch {
        self.model.arch
    }
}

fn merge_toml(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge_toml(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_through_toml() {
        for name in PRESETS {
            let c = TrainConfig::preset(name).expect("preset");
            let text = c.to_toml().expect("toml");
            assert_eq!(TrainConfig::from_toml_str(&text, "t").expect("parse"), c);
        }
        let c = TrainConfig::preset("443m").expect("preset");
        assert_eq!((c.model.d_model, c.model.n_layers, c.model.n_heads), (1024, 24, 16));
        assert!(TrainConfig::preset("3b").is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = TrainConfig::from_toml_str("[model]\nd_modle = 3\n", "x.toml").expect_err("typo");
        assert!(e.to_string().contains("d_modle"), "{e}");
        let base = TrainConfig::preset("tiny").expect("preset");
        assert!(base.apply_overrides(&["model.d_modle=3".into()]).is_err());
        assert!(base.apply_overrides(&["nosuch.key=3".into()]).is_err());
    }

    #[test]
    fn a_config_file_lays_over_the_preset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[model]\nd_model = 64\n[train]\nsteps = 9\n").expect("write");
        let c = TrainConfig::preset("tiny").expect("preset").merge_file(&path).expect("merge");
        assert_eq!((c.model.d_model, c.model.n_layers, c.train.steps), (64, 4, 9));
        std::fs::write(&path, "[model]\nd_model = 64\nwidth = 3\n").expect("write");
        assert!(TrainConfig::preset("tiny").expect("preset").merge_file(&path).is_err());
    }

    #[test]
    fn global_batch_sets_accumulation_per_world_size() {
        let mut c = TrainConfig::preset("tiny").expect("preset");
        c.data.batch_size = 2;
        c.optim.grad_accum = 3;
        c.resolve_global_batch(2).expect("derive");
        assert_eq!((c.optim.global_batch, c.optim.grad_accum), (12, 3));
        c.resolve_global_batch(3).expect("3 ranks");
        assert_eq!(c.optim.grad_accum, 2);
        c.resolve_global_batch(1).expect("1 rank");
        assert_eq!(c.optim.grad_accum, 6);
        let e = c.resolve_global_batch(5).expect_err("12 rows over 5 ranks");
        assert!(e.to_string().contains("not a multiple of data.batch_size 2 × 5 ranks"), "{e}");
        c.data.synthetic = true;
        for (text, every) in [("true", 1), ("false", 0), ("3", 3)] {
            let o = c.apply_overrides(&[format!("train.activation_checkpointing={text}")]).expect("override");
            assert_eq!(o.train.activation_checkpointing.every(), every, "{text}");
            let back = TrainConfig::from_toml_str(&o.to_toml().expect("toml"), "t").expect("parse");
            assert_eq!(back.train.activation_checkpointing, o.train.activation_checkpointing);
        }
        let mut moe = c.apply_overrides(&["train.activation_checkpointing=true".into()]).expect("override");
        moe.model.arch = Arch::Moe;
        assert!(moe.validate().expect_err("moe").to_string().contains("activation_checkpointing"));
        c.train.zero = 2;
        assert!(c.validate().expect_err("zero 2").to_string().contains("train.zero"));
        c.train.zero = 3;
        assert!(c.validate().expect_err("zero 3 alone").to_string().contains("activation_checkpointing = true"));
        c.train.activation_checkpointing = Checkpointing::All(true);
        c.validate().expect("zero 3 with checkpointing");
    }

    #[test]
    fn nonsense_values_are_config_errors_naming_the_key() {
        // Each of these once reached training: as an allocation abort or a panic (sizes,
        // diffusion_steps -1, an infinite timeout), or as a NaN loss at step 1 (norm_eps,
        // rope_theta, init_std).
        let mut base = TrainConfig::preset("tiny").expect("preset");
        base.data.synthetic = true;
        base.validate().expect("tiny is valid");
        for (set, key) in [
            ("model.vocab_size=4294967296", "vocab_size"),
            ("model.d_model=4294967296", "d_model"),
            ("model.n_layers=99999999999999", "n_layers"),
            ("model.ffn_hidden=-1", "ffn_hidden"),
            ("model.latent_dim=4294967296", "latent_dim"),
            ("model.diffusion_steps=-1", "diffusion_steps"),
            ("model.diffusion_steps=4294967296", "diffusion_steps"),
            ("model.norm_eps=-1.0", "norm_eps"),
            ("model.rope_theta=0.0", "rope_theta"),
            ("model.init_std=nan", "init_std"),
            ("data.batch_size=4294967296", "data.batch_size"),
            ("data.prefetch=4294967296", "data.prefetch"),
            ("optim.grad_accum=4294967296", "optim.grad_accum"),
            ("optim.lr=inf", "optim.lr"),
            ("optim.min_lr=nan", "optim.lr"),
            ("optim.beta2=1.0", "optim.beta1 / optim.beta2"),
            ("optim.eps=0.0", "optim.eps"),
            ("optim.weight_decay=nan", "optim.weight_decay"),
            ("optim.grad_clip=nan", "optim.grad_clip"),
            ("train.dist_timeout_s=inf", "train.dist_timeout_s"),
            ("train.checkpoint_shard_mb=0.0", "train.checkpoint_shard_mb"),
            ("train.peak_tflops=nan", "train.peak_tflops"),
        ] {
            let c = base.apply_overrides(&[set.to_string()]).expect("parses");
            let e = c.validate().expect_err(set).to_string();
            assert!(e.contains(key), "{set}: {e}");
        }
    }

    #[test]
    fn overrides_parse_values() {
        let base = TrainConfig::preset("tiny").expect("preset");
        let c = base
            .apply_overrides(&[
                "model.arch=dense".into(),
                "train.steps=7".into(),
                "optim.lr=0.01".into(),
                "data.paths=[\"a\", \"b\"]".into(),
                "model.qk_norm=false".into(),
            ])
            .expect("overrides");
        assert_eq!(c.model.arch, Arch::Dense);
        assert_eq!(c.train.steps, 7);
        assert_eq!(c.optim.lr, 0.01);
        assert_eq!(c.data.paths, vec![PathBuf::from("a"), PathBuf::from("b")]);
        assert!(!c.model.qk_norm);
        // A value of the wrong type or variant is named by its key and value, not by a line of
        // the re-serialized TOML the overrides are checked in.
        for (set, key, says) in [
            ("model.arch=zzz", "model.arch", "expected one of `dense`, `mot`, `moe`"),
            ("model.d_model=abc", "model.d_model", "expected i64"),
            ("train.steps=-3", "train.steps", "u64"),
        ] {
            let e = base.apply_overrides(&["train.seed=3".into(), set.into()]).expect_err(set).to_string();
            assert!(e.contains(key) && e.contains(says) && !e.contains("line"), "{set}: {e}");
        }
        // A key the serialized config skips when empty (`data.origins`, as `--resume --data`
        // sets it) is still a key; a misspelt one is not.
        assert!(base.data.origins.is_empty());
        let c = base.apply_overrides(&["data.origins=[\"\"]".into()]).expect("data.origins");
        assert_eq!(c.data.origins, vec![String::new()]);
        let e = base.apply_overrides(&["data.origin=[\"\"]".into()]).expect_err("misspelt").to_string();
        assert!(e.contains("data.origin") && e.contains("unknown key"), "{e}");
    }

    /// `--auto-resume`: a command's `[train]` keys become overrides; a model change is a
    /// conflict; keys the run resolved at start (vocabulary, global batch) are not, when the
    /// command leaves them 0.
    #[test]
    fn resume_delta_splits_overrides_from_conflicts() {
        let fresh = TrainConfig::preset("tiny").expect("preset");
        let mut saved = fresh.clone();
        saved.model.vocab_size = 4487;
        saved.optim.global_batch = 8;
        saved.train.steps = 10;
        saved.data.paths = vec![PathBuf::from("/cache/corpus")];
        let (sets, conflicts) = saved.resume_delta(&fresh).expect("delta");
        assert_eq!(sets, vec![format!("train.steps={}", fresh.train.steps)]);
        assert!(conflicts.is_empty(), "{conflicts:?}");
        let mut other = fresh.clone();
        other.model.d_model = 8;
        other.model.vocab_size = 99;
        let (_, conflicts) = saved.resume_delta(&other).expect("delta");
        assert_eq!(conflicts.len(), 2, "{conflicts:?}");
        assert!(
            conflicts[0].starts_with("model.d_model: ")
                && conflicts[1].starts_with("model.vocab_size: 4487 there, 99 here"),
            "{conflicts:?}"
        );
    }
}
