//! `motley export`: a dense checkpoint as a Hugging Face transformers model folder
//! (`Qwen3ForCausalLM` with QK-norm, `LlamaForCausalLM` without), loadable with
//! `AutoModelForCausalLM.from_pretrained`.

use std::path::PathBuf;

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  motley export --checkpoint runs/tiny-dense --out hf/tiny-dense\n  \
                        motley export --checkpoint s3://bkt/runs/443m-dense --out hf/443m --json\n\n\
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
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
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
