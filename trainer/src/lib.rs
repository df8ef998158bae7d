//! motley-trainer: Mixture-of-Transformers (and dense / MoE-4x baselines) trained with libtorch.
//!
//! - [`model`]: the transformer, all three architectures (Config → Attention → FFN → Block →
//!   Model); [`layout`]: what a step derives from a batch before the model runs (routing,
//!   masks, RoPE, latent inputs and their noise); [`towers`]: per-tower parameter storage.
//! - [`diffusion`]: the Transfusion setting's noise schedule, DDPM/DDIM steps, image generation.
//! - [`train`]: the loop, evaluation, checkpoints and resume, the MoT-vs-dense comparison.
//! - [`study`]: step matching (the paper's measure): the step at which MoT / MoE reach dense's
//!   final held-out loss, per modality, over several seeds.
//! - [`config`]: TOML config, presets, overrides.
//! - [`optim`]: AdamW with saveable moments, warmup + cosine schedule.
//! - [`data`] / [`loader`]: the `BatchSource` seam, the shard loader, synthetic data.
//! - [`sample`]: generation from a checkpoint (KV-cached decoding, constrained sampling).
//! - [`export`]: a dense checkpoint as a transformers (Llama / Qwen3) model folder.
//! - [`checkpoint`], [`metrics`]: files on disk, metrics and plot ([`tensorboard`]: the same
//!   as TensorBoard events); [`per_rank`]: checkpoints
//!   each rank writes its chunk of, and range reads of any checkpoint; [`mirror`]: the hook that
//!   copies a run's checkpoints elsewhere (an object store) as they are written.
//! - [`dist`]: data parallelism on torch's c10d (launch variables, process groups, gradient
//!   buckets from autograd hooks, heartbeats); [`flat`]: the flat buffers' layout, buckets and
//!   ZeRO shards; [`fsdp`]: ZeRO-3, each block's weights gathered around its runs.
//! - [`ops`]: counting the operators a step dispatches (how launch-bound it is), the bytes it
//!   allocates, and the C++ ops (tower_linear, chunked cross-entropy, block checkpointing).
//! - [`profile`]: torch's profiler over a window of steps (Chrome traces) and their summary.
//! - [`plan`]: bytes per GPU of a run (weights, gradients, moments, activations, loss) and the
//!   settings that make it fit.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod diffusion;
pub mod dist;
pub mod error;
pub mod export;
pub mod flat;
pub mod fsdp;
pub mod layout;
pub mod loader;
pub mod metrics;
pub mod mirror;
pub mod model;
pub mod ops;
pub mod optim;
pub mod per_rank;
pub mod plan;
pub mod profile;
pub mod sample;
pub mod study;
pub mod tensorboard;
pub mod towers;
pub mod train;

pub use config::TrainConfig;
pub use error::TrainError;
pub use model::{Arch, Model, ModelConfig};
pub use train::{Comparison, TrainSummary, Trainer, compare_architectures, compare_mot_dense, evaluate_checkpoint};

/// The tch this crate links, for tools that drive the model directly (benchmarks).
pub use tch;
