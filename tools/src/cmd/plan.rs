//! `motley plan`: bytes per GPU of a run (weights, gradients, AdamW moments, activations, the
//! loss), the largest micro-batch that fits and the settings that make a run fit.

use std::path::PathBuf;

use anyhow::Context;
use motley_trainer::config::PRESETS;
use motley_trainer::plan::{Target, fewest_ranks, parse_bytes, plan};
use motley_trainer::{Arch, TrainConfig};
use serde::Serialize;

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  motley plan --preset 7b --arch mot --gpus 64 --gpu-mem 80GB\n  motley plan --preset \
                        1.5b --gpus 8 --gpu-mem 40GB --set train.zero=3 --set train.activation_checkpointing=true\n  \
                        motley plan --table --json"
)]
pub struct Args {
    /// Preset to plan (see `motley train --help`).
    #[arg(long, default_value = "7b")]
    preset: String,
    /// TOML config laid over the preset.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Architecture: mot, dense or moe.
    #[arg(long)]
    arch: Option<Arch>,
    /// Override any config key, as for `motley train`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Data-parallel ranks (one GPU each).
    #[arg(long, default_value_t = 8)]
    gpus: usize,
    /// Memory of one GPU: 80GB, 40GB, 24GiB, ...
    #[arg(long, default_value = "80GB")]
    gpu_mem: String,
    /// cuda (bf16 compute) or cpu (fp32).
    #[arg(long, default_value = "cuda", value_parser = ["cuda", "cpu"])]
    target: String,
    /// Vocabulary size when the config takes it from the corpus (Chameleon's 65,536).
    #[arg(long, default_value_t = 65_536)]
    vocab: i64,
    /// Every preset × architecture: the fewest GPUs of 80 GB and of 40 GB and the settings.
    #[arg(long)]
    table: bool,
}

/// One row of `--table`.
#[derive(Debug, Serialize)]
struct Row {
    preset: String,
    arch: Arch,
    params: i64,
    gpus_80gb: Option<usize>,
    settings_80gb: Vec<String>,
    gpus_40gb: Option<usize>,
    settings_40gb: Vec<String>,
}

fn resolve(args: &Args, preset: &str, arch: Option<Arch>) -> anyhow::Result<TrainConfig> {
    let mut sets = Vec::new();
    if let Some(a) = arch {
        sets.push(format!("model.arch=\"{a}\""));
    }
    sets.extend(args.set.iter().cloned());
    let mut cfg = TrainConfig::layered(preset, args.config.as_deref(), &sets)?;
    // A plan needs no corpus: validate everything else.
    if cfg.data.paths.is_empty() {
        cfg.data.synthetic = true;
    }
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let target = if args.target == "cpu" { Target::Cpu } else { Target::Cuda };
    if args.table {
        let mut rows = Vec::new();
        for preset in PRESETS.iter().filter(|p| **p != "tiny") {
            for arch in [Arch::Dense, Arch::Mot] {
                let cfg = resolve(&args, preset, Some(arch))?;
                let fit = |mem: f64| fewest_ranks(&cfg, mem, target, args.vocab);
                let (a, b) = (fit(80e9), fit(40e9));
                let m = {
                    let mut m = cfg.model.clone();
                    if m.vocab_size == 0 {
                        m.vocab_size = args.vocab;
                    }
                    m
                };
                rows.push(Row {
                    preset: preset.to_string(),
                    arch,
                    params: m.param_count(),
                    gpus_80gb: a.as_ref().map(|x| x.0),
                    settings_80gb: a.map(|x| x.1).unwrap_or_default(),
                    gpus_40gb: b.as_ref().map(|x| x.0),
                    settings_40gb: b.map(|x| x.1).unwrap_or_default(),
                });
            }
        }
        if ctx.json {
            return output::json(&rows);
        }
        let cell = |g: Option<usize>, s: &[String]| match g {
            None => "does not fit".to_string(),
            Some(g) if s.is_empty() => format!("{g}"),
            Some(g) => format!("{g}: {}", s.join(" ")),
        };
        let mut out = String::from(
            "| preset | arch | parameters | 80 GB GPUs: settings | 40 GB GPUs: settings |\n|---|---|---|---|---|\n",
        );
        for r in &rows {
            out.push_str(&format!(
                "| {} | {} | {:.2} B | {} | {} |\n",
                r.preset,
                r.arch,
                r.params as f64 / 1e9,
                cell(r.gpus_80gb, &r.settings_80gb),
                cell(r.gpus_40gb, &r.settings_40gb)
            ));
        }
        return output::line(out.trim_end());
    }
    let mem =
        parse_bytes(&args.gpu_mem).with_context(|| format!("--gpu-mem {:?}: expected e.g. 80GB", args.gpu_mem))?;
    let cfg = resolve(&args, &args.preset, args.arch)?;
    let p = plan(&cfg, args.gpus.max(1), mem, target, args.vocab);
    if ctx.json { output::json(&p) } else { output::line(p.table().trim_end()) }
}
