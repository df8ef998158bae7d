//! The memory plan of a run: bytes per GPU (or per CPU process) for weights, gradients, AdamW
//! moments, the compute-precision weight copies kept for backward, block activations (with and
//! without checkpointing) and the loss, for a config, a number of ranks and the memory of one;
//! the largest micro-batch that fits; and the settings that would make a run fit.
//!
//! Activations follow what motley's layers keep for backward, per token per block: about
//! 21·d_model + 4·ffn floats for MoT (16.7·d_model + 4·ffn dense; per-tower QK-norm and norm
//! weights make the difference), measured on CPU with `ops::track_memory` (the test beside
//! this file checks the plan against a real step within 15 %); a `[B, 1, T, T]` float mask per
//! block while packed rows are masked; and each block's pre-norm-folded weights (a new tensor
//! per step, saved for its matmul). In bf16 on CUDA the matmul-side tensors halve: there the
//! plan counts 0.75 of the fp32 bytes, an estimate until a GPU measures it.

use serde::Serialize;

use crate::config::TrainConfig;
use crate::model::Arch;

/// Per-token floats kept per block: `alpha · d_model + BETA · ffn`.
const ALPHA_MOT: f64 = 21.2;
const ALPHA_DENSE: f64 = 16.7;
const BETA: f64 = 4.0;

/// Where the run computes: sets the compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// fp32 compute.
    Cpu,
    /// bf16 compute, fp32 master weights.
    Cuda,
}

/// Bytes one rank holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Bytes {
    /// Held between steps (under ZeRO-3 this rank's chunks only).
    pub weights: f64,
    pub gradients: f64,
    pub moments: f64,
    /// ZeRO-3: weights gathered (unit 0 and two blocks) and gradient buffers (unit 0 and one
    /// block) inside a step.
    pub gathered: f64,
    /// Part of `activations`: the weight copies blocks keep for backward (pre-norm-folded
    /// weights; in bf16 every projection's cast).
    pub weight_copies: f64,
    /// Activations at their most, as configured: kept for backward, plus one block's during
    /// its recomputation when blocks are checkpointed.
    pub activations: f64,
    /// The same without checkpointing and with every block checkpointed.
    pub activations_full: f64,
    pub activations_checkpointed: f64,
    /// Logits, their log-softmax and gradient (full), or one chunk of them.
    pub loss: f64,
    /// What a training step allocates at its peak on top of what exists between steps: the
    /// activations kept for backward, the larger of the loss's buffers and a recomputed block's
    /// activations (they never coexist), and under ZeRO-3 the gathered units.
    pub step: f64,
    pub total: f64,
}

/// The plan for one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub preset: String,
    pub arch: Arch,
    pub params: i64,
    pub ranks: usize,
    pub memory_per_rank: f64,
    pub target: Target,
    pub micro_batch: usize,
    pub seq_len: usize,
    pub zero: u8,
    pub activation_checkpointing: usize,
    pub ce_chunk_rows: i64,
    pub bytes: Bytes,
    pub fits: bool,
    /// The largest micro-batch (rows per rank) that fits with these settings (0: none).
    pub max_micro_batch: usize,
    /// Settings that make the run fit when it does not, most economical first.
    pub suggestions: Vec<String>,
}

/// Bytes of one rank for `cfg` (its `vocab_size` must be set) at micro-batch `b`.
fn bytes(cfg: &TrainConfig, ranks: usize, target: Target, b: usize) -> Bytes {
    let m = &cfg.model;
    let p = m.param_count() as f64;
    let n = ranks.max(1) as f64;
    let zero = cfg.train.zero;
    let shard = |stage: u8, x: f64| if zero >= stage { x / n } else { x };
    let (d, f, l) = (m.d_model as f64, m.ffn_dim() as f64, m.n_layers as f64);
    let t = m.towers() as f64;
    let seq = cfg.data.seq_len as f64;
    let tokens = b as f64 * seq;
    let ck = match target {
        Target::Cpu => 4.0,
        Target::Cuda => 2.0,
    };
    // ZeRO-3 (`crate::fsdp`) holds unit 0 (embedding, head, final norm) gathered for the step
    // with its gradient, at most two gathered blocks (one running, one prefetched) and two
    // blocks' gradient buffers.
    let head_towers = if m.untie_head { t } else { 1.0 };
    let v = m.vocab_size as f64;
    let root = v * d * (1.0 + head_towers) + d * head_towers;
    let block = ((p - root) / l.max(1.0)).max(0.0);
    let weights = if zero == 3 { 4.0 * p / n } else { 4.0 * p };
    // (Gradient buffers: unit 0's, the block's backward filling one, the previous block's being
    // reduce-scattered; in a world of one nothing is left running.)
    let grad_blocks = if n > 1.0 { 2.0 } else { 1.0 };
    let gathered =
        if zero == 3 { 4.0 * root + 2.0 * 4.0 * block + 4.0 * root + grad_blocks * 4.0 * block } else { 0.0 };
    // ZeRO-1 keeps the whole flat gradient (backward writes it) plus this rank's reduced shard.
    let gradients = match zero {
        0 => 4.0 * p,
        1 => 4.0 * p + 4.0 * p / n,
        _ => 4.0 * p / n,
    };
    let moments = shard(1, 8.0 * p);
    // Per block: the pre-norm-folded Q|K|V and gate|up weights are new tensors each step; in
    // bf16 every projection's weight is cast (O and down too).
    let block_w = match (m.arch, target) {
        (Arch::Moe, _) => 0.0,
        (_, Target::Cpu) => t * (3.0 * d * d + 2.0 * f * d) * ck,
        (_, Target::Cuda) => t * (4.0 * d * d + 3.0 * f * d) * ck,
    };
    let alpha = if m.arch == Arch::Mot { ALPHA_MOT } else { ALPHA_DENSE };
    let precision = match target {
        Target::Cpu => 1.0,
        Target::Cuda => 0.75,
    };
    let per_block = tokens * (alpha * d + BETA * f) * 4.0 * precision + 4.0 * b as f64 * seq * seq + block_w;
    let every = cfg.train.activation_checkpointing.every();
    let full = l * per_block;
    // Checkpointed: each block keeps its input; backward recomputes one block at a time.
    let checkpointed = l * tokens * d * 4.0 + per_block;
    // Held through backward, and what a checkpointed block's recomputation adds on top.
    let (held, recompute) = if every == 0 {
        (full, 0.0)
    } else {
        let kept = (l / every as f64).ceil();
        (kept * tokens * d * 4.0 + (l - kept) * per_block, per_block)
    };
    let activations = held + recompute;
    let rows = if m.ce_chunk_rows > 0 { (m.ce_chunk_rows as f64).min(tokens) } else { tokens };
    // At the head's backward: the saved log-probabilities, their gradient and the logits'
    // gradient, `[rows, V]` fp32 each; chunked, one chunk's worth and the op's `[V, D]` weight-
    // gradient accumulator and chunk product; and the hidden state's gradient.
    let loss = if m.ce_chunk_rows > 0 {
        3.0 * rows * v * 4.0 + 2.0 * v * d * 4.0 + tokens * d * 4.0
    } else {
        3.0 * rows * v * 4.0 + tokens * d * 4.0
    };
    let weight_copies = if every == 0 { l * block_w } else { block_w };
    // The loss's buffers live at the head's backward, before any block recomputes: a step's
    // peak is what is held plus the larger of the two.
    let step = held + loss.max(recompute) + gathered;
    let total = weights + gradients + moments + step;
    Bytes {
        weights,
        gradients,
        moments,
        gathered,
        weight_copies,
        activations,
        activations_full: full,
        activations_checkpointed: checkpointed,
        loss,
        step,
        total,
    }
}

/// The plan for `cfg` on `ranks` ranks of `memory_per_rank` bytes. A config whose vocabulary
/// comes from the corpus (`vocab_size = 0`) is planned with `default_vocab` ids.
pub fn plan(cfg: &TrainConfig, ranks: usize, memory_per_rank: f64, target: Target, default_vocab: i64) -> Plan {
    let mut cfg = cfg.clone();
    if cfg.model.vocab_size == 0 {
        cfg.model.vocab_size = default_vocab;
    }
    let (cfg, m) = (&cfg, &cfg.model);
    let b = cfg.data.batch_size;
    let now = bytes(cfg, ranks, target, b);
    let fits = now.total <= memory_per_rank;
    let largest =
        |c: &TrainConfig| (1..=4096usize).take_while(|&k| bytes(c, ranks, target, k).total <= memory_per_rank).last();
    let max_micro_batch = largest(cfg).unwrap_or(0);
    let mut suggestions = Vec::new();
    if !fits {
        // Try the cheaper levers first, each added to the ones before: chunked loss,
        // checkpointing, ZeRO-1, ZeRO-3 (there is no ZeRO-2: gradients shard with the weights;
        // ZeRO-3 needs every block checkpointed, which MoE blocks are not).
        let mut tries: Vec<(Vec<String>, TrainConfig)> = Vec::new();
        let mut c = cfg.clone();
        let mut said: Vec<String> = Vec::new();
        if c.model.ce_chunk_rows == 0 {
            c.model.ce_chunk_rows = 4096;
            said.push("model.ce_chunk_rows=4096".into());
            tries.push((said.clone(), c.clone()));
        }
        if c.train.activation_checkpointing.every() != 1 && m.arch != Arch::Moe {
            c.train.activation_checkpointing = crate::config::Checkpointing::All(true);
            said.push("train.activation_checkpointing=true".into());
            tries.push((said.clone(), c.clone()));
        }
        for stage in [1u8, 3].into_iter().filter(|&s| s > cfg.train.zero && (s < 3 || m.arch != Arch::Moe)) {
            c.train.zero = stage;
            let mut with = said.clone();
            with.push(format!("train.zero={stage}"));
            tries.push((with, c.clone()));
        }
        for (with, c) in tries {
            if bytes(&c, ranks, target, b).total <= memory_per_rank {
                suggestions.push(with.join(" "));
                break;
            }
        }
        if suggestions.is_empty() {
            suggestions.push(format!(
                "does not fit on {ranks} rank(s) of {:.3} GB even with every setting: more ranks or a smaller micro-batch",
                memory_per_rank / 1e9
            ));
        }
    }
    Plan {
        preset: cfg.preset.clone(),
        arch: m.arch,
        params: m.param_count(),
        ranks,
        memory_per_rank,
        target,
        micro_batch: b,
        seq_len: cfg.data.seq_len,
        zero: cfg.train.zero,
        activation_checkpointing: cfg.train.activation_checkpointing.every(),
        ce_chunk_rows: m.ce_chunk_rows,
        bytes: now,
        fits,
        max_micro_batch,
        suggestions,
    }
}

/// The fewest ranks (powers of two up to 4096) of `memory_per_rank` bytes that fit `cfg` at its
/// micro-batch, with the cheapest settings that make it fit: `(ranks, settings)`, None when
/// nothing does.
pub fn fewest_ranks(
    cfg: &TrainConfig,
    memory_per_rank: f64,
    target: Target,
    default_vocab: i64,
) -> Option<(usize, Vec<String>)> {
    (0..=12).map(|k| 1usize << k).find_map(|ranks| {
        let p = plan(cfg, ranks, memory_per_rank, target, default_vocab);
        if p.fits {
            return Some((ranks, Vec::new()));
        }
        let s = p.suggestions.first()?;
        (!s.starts_with("does not fit")).then(|| (ranks, s.split_whitespace().map(str::to_string).collect()))
    })
}

impl Plan {
    /// A table of the bytes per rank, in GB.
    pub fn table(&self) -> String {
        let gb = |x: f64| format!("{:>9.2} GB", x / 1e9);
        let b = &self.bytes;
        let mut s = format!(
            "{} {} ({:.2} B parameters), {} rank(s) of {:.0} GB, {:?}: micro-batch {} × {} tokens, zero {}, \
             checkpointing {}, loss chunk {}\n",
            self.preset,
            self.arch,
            self.params as f64 / 1e9,
            self.ranks,
            self.memory_per_rank / 1e9,
            self.target,
            self.micro_batch,
            self.seq_len,
            self.zero,
            match self.activation_checkpointing {
                0 => "off".to_string(),
                1 => "every block".to_string(),
                k => format!("every {k}th block"),
            },
            if self.ce_chunk_rows > 0 { format!("{} rows", self.ce_chunk_rows) } else { "off".into() },
        );
        for (name, v) in [
            ("weights", b.weights),
            ("gradients", b.gradients),
            ("optimizer moments", b.moments),
            ("gathered (ZeRO-3)", b.gathered),
            ("activations", b.activations),
            ("  without checkpointing", b.activations_full),
            ("  every block checkpointed", b.activations_checkpointed),
            ("loss (logits)", b.loss),
            ("total", b.total),
        ] {
            s.push_str(&format!("{name:<28}{}\n", gb(v)));
        }
        s.push_str(&format!(
            "{}; the largest micro-batch that fits as configured: {}\n",
            if self.fits { "fits as configured" } else { "does NOT fit as configured" },
            self.max_micro_batch
        ));
        for sug in &self.suggestions {
            s.push_str(&format!("fits with: --set {}\n", sug.replace(' ', " --set ")));
        }
        s
    }
}

/// Parses `80GB`, `40G`, `24GiB`, `512MB` or a plain byte count.
pub fn parse_bytes(text: &str) -> Option<f64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.trim().parse().ok()?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (x >= 0.0).then_some(x * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("80GB"), Some(80e9));
        assert_eq!(parse_bytes("24GiB"), Some(24.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(parse_bytes("512 MB"), Some(512e6));
        assert_eq!(parse_bytes("x"), None);
    }

    #[test]
    fn sharding_and_checkpointing_shrink_the_right_parts() {
        let mut c = TrainConfig::preset("1.5b").expect("preset");
        let base = plan(&c, 8, 80e9, Target::Cuda, 65_536);
        c.train.zero = 1;
        let z1 = plan(&c, 8, 80e9, Target::Cuda, 65_536);
        assert!((z1.bytes.moments - base.bytes.moments / 8.0).abs() < 1.0);
        assert_eq!(z1.bytes.weights, base.bytes.weights);
        c.train.activation_checkpointing = crate::config::Checkpointing::All(true);
        let ck = plan(&c, 8, 80e9, Target::Cuda, 65_536);
        assert!(
            ck.bytes.activations < z1.bytes.activations / 4.0,
            "{} vs {}",
            ck.bytes.activations,
            z1.bytes.activations
        );
        c.model.ce_chunk_rows = 4096;
        let ch = plan(&c, 8, 80e9, Target::Cuda, 65_536);
        assert!(ch.bytes.loss < ck.bytes.loss / 4.0);
    }
}
