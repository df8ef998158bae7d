//! `motley bench sample`: decoding time with the KV cache against full recomputation per
//! token, at several generation lengths, in one run — with the cache, time grows linearly in
//! the tokens generated; without it, each token re-runs the whole prefix.

use std::path::PathBuf;

use motley_shards::Vocab;
use motley_trainer::model::{Arch, Model, ModelConfig};
use motley_trainer::sample::{Constraints, GenerateOptions, Sampler, SamplingConfig, generate, load_run};
use motley_trainer::tch::nn;
use motley_trainer::train::resolve_device;

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  motley bench sample\n  motley bench sample --checkpoint runs/demo/train/mot \
                        --tokens 64,256\n  motley bench sample --device cuda --d-model 1024 --layers 24 --heads 16 --json")]
pub struct Args {
    /// A trained run to decode with; default: a randomly initialized model of the shape below.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Generation lengths to time (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    tokens: Vec<usize>,
    /// Shape of the random model (the tiny preset's by default).
    #[arg(long, default_value_t = 128)]
    d_model: i64,
    #[arg(long, default_value_t = 4)]
    layers: i64,
    #[arg(long, default_value_t = 4)]
    heads: i64,
    #[arg(long, default_value = "mot")]
    arch: Arch,
    /// Timed repetitions per measurement (the fastest counts: the machine may be shared).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Skip the no-cache baseline.
    #[arg(long)]
    no_baseline: bool,
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    tokens: usize,
    kv_cache: bool,
    seconds: f64,
    ms_per_token: f64,
    tokens_per_second: f64,
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let (model, vocab, _vs, label) = match &args.checkpoint {
        Some(p) => {
            let r = load_run(p, &args.device, None)?;
            let label = format!("{} (step {})", r.checkpoint.display(), r.step);
            (r.model, r.vocab, r.vs, label)
        }
        None => {
            let vocab = Vocab::build(4096, 256, 128, None);
            let cfg = ModelConfig {
                arch: args.arch,
                vocab_size: i64::from(vocab.total_size),
                d_model: args.d_model,
                n_layers: args.layers,
                n_heads: args.heads,
                ffn_multiple_of: 32,
                ..ModelConfig::default()
            };
            let vs = nn::VarStore::new(resolve_device(&args.device)?);
            let model = Model::new_seeded(&vs.root(), &cfg, 0)?;
            let label = format!("random {} d{} L{} H{}", cfg.arch, cfg.d_model, cfg.n_layers, cfg.n_heads);
            (model, vocab, vs, label)
        }
    };
    // No images (an image once begun would run past the length asked for); text and speech
    // keep every generation exactly `n` tokens long.
    let constraints = Constraints::new(&vocab, 0, 250)?;
    let bos = vocab.special("bos").unwrap_or(0);
    let prompt: Vec<u32> = std::iter::once(bos).chain(10..18).collect();
    let time = |n: usize, use_cache: bool| -> anyhow::Result<Row> {
        let mut best = f64::INFINITY;
        let mut k = 0;
        for _ in 0..args.repeat.max(1) {
            let mut s = Sampler::new(SamplingConfig { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 })?;
            let opts = GenerateOptions { max_tokens: n, stop_at_eos: false, stop_after_image: false, use_cache };
            let g = generate(&model, &vocab, &constraints, &prompt, &mut s, &opts, |_| {})?;
            best = best.min(g.decode_seconds);
            k = g.tokens.len();
        }
        eprintln!("{k:>5} tokens, {:<8}: {best:.3}s", if use_cache { "KV cache" } else { "no cache" });
        Ok(Row {
            tokens: k,
            kv_cache: use_cache,
            seconds: best,
            ms_per_token: 1e3 * best / k.max(1) as f64,
            tokens_per_second: k as f64 / best.max(1e-9),
        })
    };
    // One untimed warm-up (allocator, first-call set-up).
    time(8, true)?;
    let mut rows = Vec::new();
    let mut cached = Vec::new();
    let mut full = Vec::new();
    for &n in &args.tokens {
        let r = time(n, true)?;
        cached.push(r.seconds);
        rows.push(r);
        if !args.no_baseline {
            let r = time(n, false)?;
            full.push(r.seconds);
            rows.push(r);
        }
    }
    if ctx.json {
        return output::json(&serde_json::json!({ "model": label, "rows": rows }));
    }
    output::line(format!("decoding, {label}, batch 1"))?;
    output::line(format!(
        "{:>7}  {:>10}  {:>10}  {:>12}  {:>12}",
        "tokens", "cache s", "ms/token", "no-cache s", "ms/token"
    ))?;
    for (i, &n) in args.tokens.iter().enumerate() {
        let c = cached[i];
        let f = full.get(i).copied();
        output::line(format!(
            "{n:>7}  {c:>10.3}  {:>10.2}  {:>12}  {:>12}",
            1e3 * c / n as f64,
            f.map_or("-".into(), |f| format!("{f:.3}")),
            f.map_or("-".into(), |f| format!("{:.2}", 1e3 * f / n as f64))
        ))?;
    }
    if args.tokens.len() >= 2 {
        let (a, b) = (0, args.tokens.len() - 1);
        let len_ratio = args.tokens[b] as f64 / args.tokens[a] as f64;
        output::line(format!(
            "{}x the tokens: KV cache {:.2}x the time{}",
            len_ratio,
            cached[b] / cached[a],
            if full.len() > b { format!(", no cache {:.2}x the time", full[b] / full[a]) } else { String::new() }
        ))?;
        if full.len() > b {
            output::line(format!("cache speed-up at {} tokens: {:.2}x", args.tokens[b], full[b] / cached[b]))?;
        }
    }
    Ok(())
}
