//! motley-trainer: Mixture-of-Transformers (and dense / MoE-4x baselines) trained with libtorch.
//!
//! - [`model`]: the transformer, all three architectures, sorted modality routing.
//! - [`data`]: the `BatchSource` seam and a synthetic source.

pub mod data;
pub mod error;
pub mod model;

pub use error::TrainError;
