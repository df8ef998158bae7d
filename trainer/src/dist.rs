//! Data parallelism seam: rank and world size from torchrun-style variables, and gradient
//! reduction behind one trait. One process needs no communication; several processes need
//! a collective backend (e.g. NCCL through cudarc), which this build does not link, so a
//! multi-process launch is refused rather than silently training divergent replicas.

use tch::Tensor;

use crate::error::TrainError;

/// Averages gradients (and logging scalars) across data-parallel ranks.
pub trait GradReducer: std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces every gradient by its mean over ranks, in place.
    fn all_reduce_mean(&self, grads: &mut [Tensor]) -> Result<(), TrainError>;
    /// Sums host-side values over ranks (loss sums and token counts for logging).
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<(), TrainError>;
}

/// A single process: reduction is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl GradReducer for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&self, _grads: &mut [Tensor]) -> Result<(), TrainError> {
        Ok(())
    }
    fn all_reduce_sum(&self, _values: &mut [f64]) -> Result<(), TrainError> {
        Ok(())
    }
}

/// `(rank, world_size)` from `RANK` / `WORLD_SIZE` (torchrun), defaulting to `(0, 1)`.
pub fn rank_from_env() -> Result<(usize, usize), TrainError> {
    let get = |name: &str, default: usize| -> Result<usize, TrainError> {
        match std::env::var(name) {
            Ok(v) => v
                .trim()
                .parse()
                .map_err(|_| TrainError::Distributed(format!("{name}={v:?} is not a non-negative integer"))),
            Err(_) => Ok(default),
        }
    };
    let (rank, world) = (get("RANK", 0)?, get("WORLD_SIZE", 1)?);
    if world == 0 || rank >= world {
        return Err(TrainError::Distributed(format!("RANK={rank} must be below WORLD_SIZE={world}")));
    }
    Ok((rank, world))
}

/// The reducer for this process.
pub fn reducer_from_env() -> Result<Box<dyn GradReducer>, TrainError> {
    let (rank, world) = rank_from_env()?;
    if world == 1 {
        return Ok(Box::new(SingleProcess));
    }
    Err(TrainError::Distributed(format!(
        "WORLD_SIZE={world} (rank {rank}), but this build has no collective backend; implement GradReducer \
         (e.g. NCCL all-reduce over Tensor::data_ptr) or run one process"
    )))
}
