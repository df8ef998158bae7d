//! `motley`: one binary for the whole data flow — tokenizers, ingest, shards, train, sample.
//!
//! Logs and progress go to stderr; results go to stdout (JSON with `--json`). A closed
//! stdout pipe (`motley shards head | head -1`) ends the program quietly with status 0.

mod cmd;
mod launch;
mod output;
mod remote;
mod remote_run;
#[cfg(test)]
mod test_alloc;

#[cfg(test)]
#[global_allocator]
static ALLOC: test_alloc::Tracking = test_alloc::Tracking;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "motley", version, about = "Modality-tagged token shards and Mixture-of-Transformers training")]
struct Cli {
    /// Print machine-readable results as JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// More logging on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Local cache of corpora read from object stores (default: $MOTLEY_CACHE/remote, else
    /// ~/.cache/motley/remote).
    #[arg(long, global = true, env = "MOTLEY_CACHE_DIR")]
    cache_dir: Option<std::path::PathBuf>,
    /// Bytes of shards that cache keeps (released shards evicted past it; default 32 GiB; 0: no limit).
    #[arg(long, global = true, env = "MOTLEY_CACHE_LIMIT")]
    cache_limit: Option<u64>,
    /// Range reads of one object in flight at once when fetching shards, inputs and
    /// checkpoints from object stores (default 8; 1: one after another).
    #[arg(long, global = true, env = "MOTLEY_RANGE_STREAMS")]
    range_streams: Option<usize>,
    /// Where pretrained image/speech encoders (VAE, VQ-GAN, Mimi) run: auto (a CUDA GPU when this
    /// build has the `cuda` feature and the machine a GPU, else the CPU), cpu, cuda or cuda:N.
    /// The trainer's device is `train --device`.
    #[arg(long, global = true, env = "MOTLEY_ENCODER_DEVICE", default_value = "auto")]
    encoder_device: motley_tokenizers::pretrained::EncoderDevice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train or fit tokenizers: text BPE, image VQ codebook / latent patches, speech units.
    #[command(subcommand)]
    Tokenizer(cmd::tokenizer::Command),
    /// Turn folders, JSONL, Parquet and WebDataset tars of text, images and speech into a shard corpus.
    Ingest(cmd::ingest::Args),
    /// Inspect, verify, decode, merge and export shard corpora.
    #[command(subcommand)]
    Shards(cmd::shards::Command),
    /// Train a Mixture-of-Transformers (or dense / MoE baseline) on shard corpora.
    Train(cmd::train::Args),
    /// Evaluate a checkpoint on a corpus: per-modality loss.
    Eval(cmd::train::EvalArgs),
    /// Write a dense checkpoint as a Hugging Face transformers model folder (Qwen3 / Llama).
    Export(cmd::export::Args),
    /// Memory per GPU of a run (weights, gradients, moments, activations, loss) and the settings that make it fit.
    Plan(cmd::plan::Args),
    /// The operators by self time of the torch profiler traces a run wrote (`train.profile_steps`).
    Profile(cmd::profile::Args),
    /// Step matching: the step at which MoT (and MoE-4x) reach dense's final held-out loss, per modality.
    Study(cmd::study::Args),
    /// Generate text, images or speech from a checkpoint.
    Sample(cmd::sample::Args),
    /// Benchmarks that print ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(cmd::bench::Command),
    /// The end-to-end demo on the bundled sample corpus.
    Demo(cmd::demo::Args),
}

fn main() {
    let cli = Cli::parse();
    output::init_logging(cli.verbose);
    let remote = remote::options(cli.cache_dir.clone(), cli.cache_limit, cli.range_streams);
    remote::install(remote.clone());
    let ctx = output::Ctx { json: cli.json, remote };
    motley_tokenizers::pretrained::set_encoder_device(cli.encoder_device);
    let result = match cli.command {
        Command::Tokenizer(c) => cmd::tokenizer::run(c, &ctx),
        Command::Ingest(a) => cmd::ingest::run(a, &ctx),
        Command::Shards(c) => cmd::shards::run(c, &ctx),
        Command::Train(a) => cmd::train::run(a, &ctx),
        Command::Eval(a) => cmd::train::eval(a, &ctx),
        Command::Export(a) => cmd::export::run(a, &ctx),
        Command::Plan(a) => cmd::plan::run(a, &ctx),
        Command::Profile(a) => cmd::profile::run(a, &ctx),
        Command::Study(a) => cmd::study::run(a, &ctx),
        Command::Sample(a) => cmd::sample::run(a, &ctx),
        Command::Bench(c) => cmd::bench::run(c, &ctx),
        Command::Demo(a) => cmd::demo::run(a, &ctx),
    };
    std::process::exit(output::exit_code(result));
}
