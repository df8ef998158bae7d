//! `motley bench ...`: every hot path measured against a baseline taken in the same run.

use crate::output::Ctx;

pub mod checkpoint;
pub mod dist;
pub mod fetch;
pub mod ingest;
pub mod loader;
pub mod sample;
pub mod tokenizers;
pub mod trainer;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Streaming loader: tokens/s as finished batches vs memcpy and a numpy.memmap packer.
    Loader(loader::Args),
    /// Tokenizers: text BPE vs HF Python, speech real-time factor, image VQ throughput.
    Tokenizers(tokenizers::Args),
    /// Text ingest end to end vs HF Python `encode_batch`.
    Ingest(ingest::Args),
    /// MoT vs dense step time, and tch vs PyTorch eager.
    Trainer(trainer::Args),
    /// Decoding with the KV cache vs full recomputation per token, at several lengths.
    Sample(sample::Args),
    /// Training's stall per checkpoint: written on the loop's thread vs in the background.
    Checkpoint(checkpoint::Args),
    /// Object-store fetch of one large object: ranges one at a time vs several in flight.
    Fetch(fetch::Args),
    /// Data parallel: collectives vs memcpy, step time at 1 and N ranks, communication share.
    Dist(dist::Args),
    /// One rank of `bench dist`'s collective measurements (started by it).
    #[command(hide = true)]
    DistWorker(dist::WorkerArgs),
}

pub fn run(cmd: Command, ctx: &Ctx) -> anyhow::Result<()> {
    match cmd {
        Command::Loader(a) => loader::run(a, ctx),
        Command::Tokenizers(a) => tokenizers::run(a, ctx),
        Command::Ingest(a) => ingest::run(a, ctx),
        Command::Fetch(a) => fetch::run(a, ctx),
        Command::Trainer(a) => trainer::run(a, ctx),
        Command::Sample(a) => sample::run(a, ctx),
        Command::Checkpoint(a) => checkpoint::run(a, ctx),
        Command::Dist(a) => dist::run(a, ctx),
        Command::DistWorker(a) => dist::worker(a),
    }
}
