//! `motley demo`: the end-to-end flow on the bundled sample corpus, as a user would run it;
//! `motley demo --study` runs the step-matching study on the sample's study mixes instead.
//!
//! Each stage runs this same binary's subcommands as child processes, so the demo shows
//! exactly the commands a user types (they are echoed) and a stage whose subcommand is not
//! built yet is named and skipped instead of silently faked.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::output::{Ctx, EXIT_NOT_BUILT};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The bundled sample corpus folder.
    #[arg(long, default_value = "data/sample")]
    sample: PathBuf,
    /// Where tokenizers, the corpus, runs and plots are written.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Training steps for each of MoT and dense (the tiny preset's default when omitted).
    #[arg(long)]
    steps: Option<u64>,
    /// Training steps of the MoTs trained on the captioned digits alone (Chameleon and
    /// Transfusion settings; their samples close the demo).
    #[arg(long, default_value_t = 400)]
    digit_steps: u64,
    /// Start over even if the output folder holds a previous demo.
    #[arg(long)]
    overwrite: bool,
    /// Run the step-matching study instead of the demo: fit the tokenizers, ingest the study
    /// mixes of data/sample/study/ in both settings, and run `motley study` on each (into
    /// OUT/study/chameleon, dense vs MoT vs MoE-4x, and OUT/study/transfusion, dense vs MoT);
    /// then, for contrast, dense vs MoT on the whole corpus (OUT/study/chameleon-whole).
    #[arg(long)]
    study: bool,
    /// Seeds of each study (with --study).
    #[arg(long, default_value_t = 3)]
    study_seeds: u64,
}

/// The demo's closing sample: a caption of the form the training images carry.
const DEMO_PROMPT: &str = "a handwritten digit seven";

/// One stage of the demo: a name and the `motley` arguments that perform it.
struct Stage {
    name: &'static str,
    args: Vec<String>,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The text BPE, fitted on the sample's text.
fn text_tokenizer(a: &Args) -> Stage {
    let tok = a.out.join("tokenizers");
    Stage {
        name: "text tokenizer (byte-level BPE)",
        args: vec![
            "tokenizer".into(),
            "train-text".into(),
            s(&a.sample.join("text")),
            "--out".into(),
            s(&tok.join("text.json")),
            "--vocab-size".into(),
            "4096".into(),
        ],
    }
}

/// The VQ codebook of the Chameleon setting.
fn vq_tokenizer(a: &Args) -> Stage {
    let tok = a.out.join("tokenizers");
    Stage {
        name: "image tokenizer (VQ codebook)",
        args: vec![
            "tokenizer".into(),
            "fit-image".into(),
            s(&a.sample.join("images")),
            "--out".into(),
            s(&tok.join("image").join("vq.safetensors")),
            // 32 px digits (8x8 originals upscaled 4x): 8 px patches give a 4x4 grid of
            // codes, each patch holding 2x2 original pixels, so the codebook has real
            // variety to learn; 4 px patches would only see the 17 grey levels.
            "--resolution".into(),
            "32".into(),
            "--patch".into(),
            "8".into(),
            "--codebook-size".into(),
            "256".into(),
        ],
    }
}

/// The speech units.
fn speech_tokenizer(a: &Args) -> Stage {
    let tok = a.out.join("tokenizers");
    Stage {
        name: "speech tokenizer (units)",
        args: vec![
            "tokenizer".into(),
            "fit-speech".into(),
            s(&a.sample.join("speech")),
            "--out".into(),
            s(&tok.join("speech").join("units.safetensors")),
            // ~120 s of sample speech is ~3,000 frames: 128 units, not the paper's 500.
            "--units".into(),
            "128".into(),
        ],
    }
}

/// The latent patch tokenizer of the Transfusion setting.
fn latent_tokenizer(a: &Args) -> Stage {
    let tok = a.out.join("tokenizers");
    Stage {
        name: "image tokenizer (latent patches, Transfusion setting)",
        args: vec![
            "tokenizer".into(),
            "fit-image".into(),
            s(&a.sample.join("images")),
            "--kind".into(),
            "latent".into(),
            "--out".into(),
            s(&tok.join("image").join("latent.safetensors")),
            "--resolution".into(),
            "32".into(),
            "--patch".into(),
            "8".into(),
            // The digits have only ~4 non-constant directions per 8 px patch.
            "--latent-dim".into(),
            "4".into(),
        ],
    }
}

/// The parts of the study mixes, in the order `data/sample/study/mix.toml` weights them.
const STUDY_PARTS: [&str; 4] = ["text", "captions", "speech", "interleaved"];

/// `motley demo --study`: the tokenizers, then per setting the four study corpora and one
/// `motley study` over their mix (dense vs MoT, MoE-4x in the Chameleon setting, several
/// seeds), then the same study on the whole corpus in one stream.
fn study_stages(a: &Args) -> Vec<Stage> {
    let tok = s(&a.out.join("tokenizers"));
    let recipes = a.sample.join("study");
    let mut v = vec![text_tokenizer(a), vq_tokenizer(a), speech_tokenizer(a), latent_tokenizer(a)];
    // The paper's MoE-4x baseline is a Chameleon-setting result; it is left out of the
    // Transfusion study to keep the whole study within a couple of CPU hours.
    for (setting, mode, moe, ingest_name, study_name) in [
        (
            "chameleon",
            "vq",
            true,
            "ingest a study corpus part (Chameleon setting: VQ image codes)",
            "step-matching study, Chameleon setting (dense, MoT, MoE-4x)",
        ),
        (
            "transfusion",
            "latent",
            false,
            "ingest a study corpus part (Transfusion setting: latent image patches)",
            "step-matching study, Transfusion setting (dense, MoT)",
        ),
    ] {
        let dir = a.out.join("study").join(setting);
        let mut study: Vec<String> = ["study", "--preset", "tiny", "--config"].map(String::from).to_vec();
        study.push(s(&recipes.join("mix.toml")));
        for part in STUDY_PARTS {
            let corpus = s(&dir.join(part));
            v.push(Stage {
                name: ingest_name,
                args: vec![
                    "ingest".into(),
                    "--config".into(),
                    s(&recipes.join(format!("{part}.toml"))),
                    "--tokenizers".into(),
                    tok.clone(),
                    "--image-mode".into(),
                    mode.into(),
                    "--out".into(),
                    corpus.clone(),
                    "--overwrite".into(),
                    "--no-progress".into(),
                ],
            });
            study.extend(["--data".into(), corpus]);
        }
        study.extend(["--seeds".into(), a.study_seeds.to_string(), "--out".into(), s(&dir.join("runs"))]);
        if let Some(n) = a.steps {
            study.extend(["--steps".into(), n.to_string()]);
        }
        if moe {
            study.push("--moe".into());
        }
        study.push("--overwrite".into());
        v.push(Stage { name: study_name, args: study });
    }
    // The contrast: the whole corpus in one stream, as the demo trains on it (images ~6%,
    // speech ~2% of positions), where each tower's modality is a minority of the data.
    let corpus = s(&a.out.join("corpus"));
    v.push(Stage {
        name: "ingest the whole sample corpus (Chameleon setting)",
        args: vec![
            "ingest".into(),
            "--config".into(),
            s(&a.sample.join("recipe.toml")),
            "--tokenizers".into(),
            tok.clone(),
            "--out".into(),
            corpus.clone(),
            "--overwrite".into(),
            "--no-progress".into(),
        ],
    });
    let mut whole: Vec<String> = ["study", "--preset", "tiny", "--data"].map(String::from).to_vec();
    whole.extend([corpus, "--seeds".into(), a.study_seeds.to_string()]);
    whole.extend(["--out".into(), s(&a.out.join("study").join("chameleon-whole"))]);
    if let Some(n) = a.steps {
        whole.extend(["--steps".into(), n.to_string()]);
    }
    whole.push("--overwrite".into());
    v.push(Stage { name: "step-matching study on the whole corpus, Chameleon setting (dense, MoT)", args: whole });
    v
}

fn stages(a: &Args) -> Vec<Stage> {
    let out = &a.out;
    let tok = out.join("tokenizers");
    let corpus = out.join("corpus");
    // Held-out loss over 16 batches (the preset's 4 hold ~130 image and often no speech target
    // tokens of this corpus: too few to compare towers on).
    let eval = ["--set".to_string(), "train.eval_batches=16".to_string()];
    // And TensorBoard events: `tensorboard --logdir runs/demo/train` draws MoT and dense together.
    let eval = [&eval[..], &["--set".to_string(), "train.tensorboard=true".to_string()]].concat();
    let mut train_common = vec!["--preset".into(), "tiny".into(), "--data".into(), s(&corpus), "--overwrite".into()];
    train_common.extend(eval.iter().cloned());
    if let Some(n) = a.steps {
        train_common.extend(["--steps".into(), n.to_string()]);
    }
    let with = |mut v: Vec<String>, extra: &[String]| {
        v.extend_from_slice(extra);
        v
    };
    let strings = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };
    // The captioned digits alone, caption first, into corpus `dst` (both settings).
    let ingest_digits = |dst: &str, extra: &[&str]| -> Vec<String> {
        let images = s(&a.sample.join("images.jsonl"));
        let (tok, dst) = (s(&tok), s(&out.join(dst)));
        let mut v = strings(&["ingest", &images, "--kind", "image", "--image-key", "image", "--text-key", "caption"]);
        v.extend(strings(&["--text-first", "1"]));
        v.extend(strings(extra));
        v.extend(strings(&["--tokenizers", &tok, "--out", &dst, "--overwrite"]));
        v
    };
    // A tiny MoT on corpus `data` for the digit steps, into run `run`.
    let train_digits = |data: &str, run: &str| -> Vec<String> {
        let (data, run) = (s(&out.join(data)), s(&out.join(run)));
        let steps = a.digit_steps.to_string();
        strings(&["train", "--preset", "tiny", "--data", &data, "--out", &run, "--steps", &steps, "--overwrite"])
    };
    vec![
        text_tokenizer(a),
        vq_tokenizer(a),
        speech_tokenizer(a),
        Stage {
            name: "ingest the sample corpus",
            args: vec![
                "ingest".into(),
                "--config".into(),
                s(&a.sample.join("recipe.toml")),
                "--tokenizers".into(),
                s(&tok),
                "--out".into(),
                s(&corpus),
                "--overwrite".into(),
            ],
        },
        Stage { name: "verify the shards", args: vec!["shards".into(), "verify".into(), s(&corpus)] },
        Stage { name: "corpus statistics", args: vec!["shards".into(), "stats".into(), s(&corpus)] },
        Stage {
            name: "train MoT and dense, compare",
            args: with(vec!["train".into(), "--compare".into(), "--out".into(), s(&out.join("train"))], &train_common),
        },
        // The same MoT on two data-parallel ranks (torch's c10d, Gloo): 2 ranks × 4 rows is the
        // single run's batch of 8, so its held-out losses land on the single run's.
        Stage {
            name: "train the MoT again on 2 data-parallel ranks",
            args: with(
                strings(&[
                    "train",
                    "--nproc",
                    "2",
                    "--out",
                    &s(&out.join("train-dp2")),
                    "--set",
                    "data.batch_size=4",
                    "--set",
                    "train.verify_replicas=true",
                ]),
                &train_common,
            ),
        },
        // What the same code needs for the paper's largest model, from the memory plan.
        Stage {
            name: "plan the paper's 7B MoT on 64 GPUs of 80 GB",
            args: strings(&["plan", "--preset", "7b", "--arch", "mot", "--gpus", "64", "--gpu-mem", "80GB"]),
        },
        Stage {
            name: "sample a digit image from the MoT run",
            // The prompt has the form of the training captions (data/sample/images.jsonl).
            args: vec![
                "sample".into(),
                "--checkpoint".into(),
                s(&out.join("train").join("mot")),
                "--prompt".into(),
                DEMO_PROMPT.into(),
                "--image".into(),
                "--seed".into(),
                "1".into(),
                "--out".into(),
                s(&out.join("samples").join("mixed")),
            ],
        },
        // 200 steps on the mixed corpus leave images a small share of what the model saw (its
        // samples are digit-like strokes that ignore the caption); the captioned digits alone,
        // caption first, for a few hundred steps give a model whose samples follow the prompt.
        Stage { name: "ingest the captioned digits alone (caption first)", args: ingest_digits("digits", &[]) },
        Stage { name: "train MoT on the captioned digits", args: train_digits("digits", "digits-mot") },
        Stage {
            name: "sample a digit image from the captioned-digits run",
            args: vec![
                "sample".into(),
                "--checkpoint".into(),
                s(&out.join("digits-mot")),
                "--prompt".into(),
                DEMO_PROMPT.into(),
                "--image".into(),
                "--seed".into(),
                "1".into(),
                "--temperature".into(),
                "0.7".into(),
                "--top-k".into(),
                "20".into(),
                "--out".into(),
                s(&out.join("samples").join("digits")),
            ],
        },
        // The Transfusion setting on the same sample: images as continuous latent patches
        // (4-dim PCA of 8 px patches) trained with the diffusion loss, text and speech as tokens.
        latent_tokenizer(a),
        Stage {
            name: "ingest the sample corpus with latent images",
            args: vec![
                "ingest".into(),
                "--config".into(),
                s(&a.sample.join("recipe-transfusion.toml")),
                "--tokenizers".into(),
                s(&tok),
                "--out".into(),
                s(&out.join("corpus-transfusion")),
                "--overwrite".into(),
            ],
        },
        Stage {
            name: "train MoT and dense in the Transfusion setting, compare",
            args: with(
                vec![
                    "train".into(),
                    "--compare".into(),
                    "--out".into(),
                    s(&out.join("train-transfusion")),
                    "--preset".into(),
                    "tiny".into(),
                    "--data".into(),
                    s(&out.join("corpus-transfusion")),
                    "--overwrite".into(),
                    eval[0].clone(),
                    eval[1].clone(),
                ],
                &a.steps.map(|n| vec!["--steps".to_string(), n.to_string()]).unwrap_or_default(),
            ),
        },
        Stage {
            name: "sample a digit image by diffusion from the Transfusion MoT",
            args: vec![
                "sample".into(),
                "--checkpoint".into(),
                s(&out.join("train-transfusion").join("mot")),
                "--prompt".into(),
                DEMO_PROMPT.into(),
                "--image".into(),
                "--seed".into(),
                "1".into(),
                "--out".into(),
                s(&out.join("samples").join("transfusion")),
            ],
        },
        // As in the Chameleon setting, the mixed run sees few images; the captioned digits
        // alone (caption first, latent patches) give a diffusion model that draws digits.
        Stage {
            name: "ingest the captioned digits alone as latent patches",
            args: ingest_digits("digits-transfusion", &["--image-mode", "latent"]),
        },
        Stage {
            name: "train a Transfusion MoT on the captioned digits",
            args: train_digits("digits-transfusion", "digits-transfusion-mot"),
        },
        Stage {
            name: "sample a digit image by diffusion from the captioned-digits Transfusion run",
            args: vec![
                "sample".into(),
                "--checkpoint".into(),
                s(&out.join("digits-transfusion-mot")),
                "--prompt".into(),
                DEMO_PROMPT.into(),
                "--image".into(),
                "--seed".into(),
                "3".into(),
                "--diffusion-steps".into(),
                "200".into(),
                "--out".into(),
                s(&out.join("samples").join("digits-transfusion")),
            ],
        },
    ]
}

pub fn run(args: Args, _ctx: &Ctx) -> anyhow::Result<()> {
    if args.out.exists() && !args.overwrite && args.out.join("demo.done").exists() {
        tracing::info!("{} holds a finished demo; rerunning its stages", args.out.display());
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let exe = std::env::current_exe().context("locating the motley binary")?;
    let mut missing = Vec::new();
    let mut failed = Vec::new();
    let all = if args.study { study_stages(&args) } else { stages(&args) };
    for stage in all {
        // A stage depends on the ones before it; once something is missing, later stages
        // would only fail on absent inputs.
        if !missing.is_empty() || !failed.is_empty() {
            missing.push(stage.name);
            continue;
        }
        // Quote arguments with spaces so the echoed command can be pasted back.
        let shown: Vec<String> =
            stage.args.iter().map(|a| if a.contains(' ') { format!("\"{a}\"") } else { a.clone() }).collect();
        eprintln!("\n==> {}\n    $ motley {}", stage.name, shown.join(" "));
        let status =
            Command::new(&exe).args(&stage.args).status().with_context(|| format!("running {}", stage.name))?;
        match status.code() {
            Some(0) => {}
            Some(EXIT_NOT_BUILT) => {
                eprintln!("    (not built yet: skipped)");
                missing.push(stage.name);
            }
            _ => failed.push(stage.name),
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("demo stage failed: {}", failed.join(", "));
    }
    if !missing.is_empty() {
        anyhow::bail!("demo incomplete; not built yet: {}", missing.join("; "));
    }
    if args.study {
        eprintln!("\nstudy finished: tables and plots in {}", args.out.join("study").display());
        return Ok(());
    }
    std::fs::write(args.out.join("demo.done"), b"")?;
    eprintln!("\ndemo finished: outputs in {}", args.out.display());
    Ok(())
}
