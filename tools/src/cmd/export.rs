//! `motley export`: a dense checkpoint as a Hugging Face transformers model folder
//! (`Qwen3ForCausalLM` with QK-norm, `LlamaForCausalLM` without), loadable with
//! `AutoModelForCausalLM.from_pretrained`; or, with `--whole`, any checkpoint (a per-rank
//! one consolidated) in motley's whole-tensor checkpoint format.

use std::path::PathBuf;

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  motley export --checkpoint runs/tiny-dense --out hf/tiny-dense\n  \
                        motley export --checkpoint s3://bkt/runs/443m-dense --out hf/443m --json\n\n\
                        motley export --checkpoint runs/7b/checkpoints/step-00010000 --out whole/7b --whole\n\n\
                        Then in Python: transformers.AutoModelForCausalLM.from_pretrained(\"hf/tiny-dense\").\n\
                        Ids are motley's global ids (OUT/motley.json has the vocabulary layout).")]
pub struct Args {
    /// Run directory (its latest checkpoint) or one checkpoint folder; either may be in an
    /// object store.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Folder to write config.json, model.safetensors and motley.json into.
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Write the checkpoint itself, whole: model.safetensors (split past
    /// train.checkpoint_shard_mb), optimizer.safetensors and meta.json, for any architecture.
    /// Consolidates a per-rank checkpoint (train.checkpoint_format = "per_rank"); the result
    /// resumes (`train --resume OUT`) and reads with any safetensors tool.
    #[arg(long)]
    whole: bool,
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    if args.whole {
        return whole(&args, ctx);
    }
    let ckpt = crate::remote_run::localize(&args.checkpoint, &ctx.remote)?;
    let r = motley_trainer::export::export_transformers(&ckpt, &args.out)?;
    if ctx.json {
        return output::json(&r);
    }
    output::line(format!(
        "wrote {} ({}, {} tensors, {:.1} M parameters) from {} (step {})",
        r.out.display(),
        r.architecture,
        r.tensors,
        r.parameters as f64 / 1e6,
        r.checkpoint.display(),
        r.step
    ))
}

fn whole(args: &Args, ctx: &Ctx) -> anyhow::Result<()> {
    let local = crate::remote_run::localize_for(&args.checkpoint, crate::remote_run::Need::Resume, &ctx.remote)?;
    let ckpt = motley_trainer::checkpoint::resolve(&local)?;
    let shard_mb = motley_trainer::checkpoint::read_meta(&ckpt)?.config.train.checkpoint_shard_mb;
    let r = motley_trainer::checkpoint::consolidate(&ckpt, &args.out, shard_mb)?;
    if ctx.json {
        return output::json(&r);
    }
    let from = r.source_world.map_or("whole tensors".to_string(), |w| format!("{w} ranks' files"));
    output::line(format!(
        "wrote {} ({} files, {:.1} M parameters) from {} (step {}, {from})",
        r.out.display(),
        r.files.len(),
        r.parameters as f64 / 1e6,
        r.checkpoint.display(),
        r.step
    ))
}
