//! End-to-end tests: the `motley` binary driven like a user would, from raw sample files to a
//! trained checkpoint — tokenizers fitted, corpus ingested, shards verified, MoT trained, eval,
//! and an image sampled from it, its log-probabilities matched by the PyTorch model of
//! docs/MODEL.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn motley() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_motley"));
    // libtorch on a 2-core machine shared with the other test binaries.
    c.env("OMP_NUM_THREADS", "1");
    c
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run_ok(args: &[&str]) -> Output {
    let out = motley().args(args).output().expect("spawn motley");
    assert!(
        out.status.success(),
        "motley {} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn help_lists_the_data_flow() {
    let out = run_ok(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["tokenizer", "ingest", "shards", "train", "sample", "bench", "demo"] {
        assert!(text.contains(sub), "--help misses {sub}:\n{text}");
    }
}

#[test]
fn sample_without_a_checkpoint_names_the_path_and_fails() {
    let missing = repo().join("runs/no-such-run-e2e");
    let out = motley()
        .args(["sample", "--checkpoint", &missing.display().to_string(), "--prompt", "seven"])
        .output()
        .expect("spawn motley");
    // 1 = an ordinary error (3 would mean "not built yet").
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-run-e2e") && err.contains("does not exist"), "{err}");
}

#[test]
fn encoder_device_cpu_encodes_and_cuda_names_the_missing_feature() {
    let vq = repo().join("tokenizers/tests/fixtures/pretrained/vq");
    let images = repo().join("data/sample/images");
    let img = std::fs::read_dir(&images)
        .expect("data/sample/images")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "png"))
        .expect("a sample PNG");
    let (vq, img) = (vq.display().to_string(), img.display().to_string());
    let encode = |dev: &str| {
        motley()
            .args(["--json", "--encoder-device", dev, "tokenizer", "encode", "--tokenizer", &vq, &img])
            .output()
            .expect("spawn motley")
    };
    let cpu = encode("cpu");
    assert!(cpu.status.success(), "{}", String::from_utf8_lossy(&cpu.stderr));
    let json: serde_json::Value = serde_json::from_slice(&cpu.stdout).expect("--json output");
    assert!(json["segment"]["ids"].as_array().is_some_and(|ids| !ids.is_empty()), "{json}");
    // `auto` on a build without CUDA is the CPU: the same codes.
    let auto = encode("auto");
    let auto: serde_json::Value = serde_json::from_slice(&auto.stdout).expect("--json output");
    assert_eq!(auto["segment"]["ids"], json["segment"]["ids"]);
    if cfg!(feature = "cuda") {
        return;
    }
    let cuda = encode("cuda:1");
    assert_eq!(cuda.status.code(), Some(1));
    let err = String::from_utf8_lossy(&cuda.stderr);
    assert!(err.contains("cuda:1: this motley was built without CUDA") && err.contains("--features cuda"), "{err}");
    // A device clap cannot parse is a usage error naming the choices.
    let bad = encode("tpu");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected auto, cpu, cuda or cuda:N"));
}

/// Copies a small, self-consistent slice of data/sample (interleaved documents and the files
/// they name, plus some text) into `dst`, so the whole flow runs in seconds in a debug build.
fn sample_subset(dst: &Path) -> std::io::Result<()> {
    let src = repo().join("data/sample");
    std::fs::create_dir_all(dst.join("images"))?;
    std::fs::create_dir_all(dst.join("speech"))?;
    std::fs::create_dir_all(dst.join("text"))?;
    let lines: Vec<String> =
        std::fs::read_to_string(src.join("interleaved.jsonl"))?.lines().take(40).map(str::to_string).collect();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).expect("sample interleaved.jsonl is valid JSON");
        for part in v["parts"].as_array().into_iter().flatten() {
            for key in ["image", "audio"] {
                if let Some(rel) = part.get(key).and_then(|p| p.as_str()) {
                    std::fs::copy(src.join(rel), dst.join(rel))?;
                }
            }
        }
    }
    std::fs::write(dst.join("interleaved.jsonl"), lines.join("\n") + "\n")?;
    let kjv = std::fs::read_to_string(src.join("text/kjv.txt"))?;
    let cut = kjv.char_indices().nth(150_000).map_or(kjv.len(), |(i, _)| i);
    std::fs::write(dst.join("text/kjv.txt"), &kjv[..cut])?;
    std::fs::write(
        dst.join("recipe.toml"),
        "[options]\nseed = 0\nmax_text_bytes = 2048\n\n\
         [[source]]\nname = \"text\"\nkind = \"text\"\npaths = [\"text/*.txt\"]\n\n\
         [[source]]\nname = \"interleaved\"\nkind = \"interleaved\"\npaths = [\"interleaved.jsonl\"]\n",
    )?;
    Ok(())
}

/// `motley shards decode` of the corpus's last 20 documents, newest first, until one holds a
/// part of `modality`: that part's first file (every modality must have had a decoder).
fn decode_last_with(corpus: &Path, manifest: &serde_json::Value, modality: &str, dec: &Path) -> Option<PathBuf> {
    let d = |p: &Path| p.display().to_string();
    let num_docs = manifest["num_docs"].as_u64().expect("num_docs");
    for doc in (0..num_docs).rev().take(20) {
        let out = run_ok(&["shards", "decode", &d(corpus), "--doc", &doc.to_string(), "--out", &d(dec), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("decode --json prints JSON");
        assert_eq!(v["missing_decoders"].as_object().map(serde_json::Map::len), Some(0), "{v}");
        let file = v["parts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["modality"] == modality)
            .flat_map(|p| p["files"].as_array().cloned().unwrap_or_default())
            .find_map(|f| f.as_str().map(str::to_string));
        if let Some(f) = file {
            return Some(dec.join(f));
        }
    }
    None
}

#[test]
fn sample_flow_tokenize_ingest_verify_train_eval() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    sample_subset(&data).expect("copy the sample subset");
    let tok = tmp.path().join("tok");
    let d = |p: &Path| p.display().to_string();

    run_ok(&[
        "tokenizer",
        "train-text",
        &d(&data.join("text")),
        "--out",
        &d(&tok.join("text.json")),
        "--vocab-size",
        "512",
    ]);
    run_ok(&[
        "tokenizer",
        "fit-image",
        &d(&data.join("images")),
        "--out",
        &d(&tok.join("image/vq.safetensors")),
        "--patch",
        "8",
        "--codebook-size",
        "32",
        "--max-iter",
        "5",
    ]);
    run_ok(&[
        "tokenizer",
        "fit-speech",
        &d(&data.join("speech")),
        "--out",
        &d(&tok.join("speech/units.safetensors")),
        "--units",
        "16",
        "--max-iter",
        "5",
    ]);

    let corpus = tmp.path().join("corpus");
    let out = run_ok(&[
        "ingest",
        "--config",
        &d(&data.join("recipe.toml")),
        "--tokenizers",
        &d(&tok),
        "--out",
        &d(&corpus),
        "--json",
        "--no-progress",
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ingest --json prints JSON");
    assert!(summary["documents"].as_u64().unwrap_or(0) > 40, "{summary}");

    run_ok(&["shards", "verify", &d(&corpus)]);
    let out = run_ok(&["shards", "stats", &d(&corpus), "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats --json prints JSON");
    let text = stats.to_string();
    for m in ["text", "image", "speech"] {
        assert!(text.contains(m), "stats misses {m}: {text}");
    }

    let run = tmp.path().join("run");
    run_ok(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        &d(&corpus),
        "--out",
        &d(&run),
        "--steps",
        "4",
        "--set",
        "train.threads=1",
    ]);
    assert!(run.join("metrics.jsonl").is_file());
    assert!(run.join("config.toml").is_file());
    let out = run_ok(&["eval", "--checkpoint", &d(&run), "--data", &d(&corpus), "--json"]);
    let eval: serde_json::Value = serde_json::from_slice(&out.stdout).expect("eval --json prints JSON");
    assert!(eval.to_string().contains("text"), "{eval}");

    // Sampling an image from the trained run: 4x4 codes decoded through the VQ codebook.
    let sample_seven = |out: &str, extra: &[&str]| -> serde_json::Value {
        let (out, run) = (d(&tmp.path().join(out)), d(&run));
        let mut args = vec!["sample", "--checkpoint", &run, "--prompt", "a handwritten digit seven"];
        args.extend(["--image", "--seed", "1", "--out", &out, "--device", "cpu", "--json"]);
        args.extend(extra);
        serde_json::from_slice(&run_ok(&args).stdout).expect("sample --json prints JSON")
    };
    let summary = sample_seven("samples", &[]);
    assert_eq!(summary["stop"], "image_done", "{summary}");
    assert_eq!(summary["generated_tokens"], 17, "16 codes and EOI: {summary}");
    let png = summary["files"][0]["path"].as_str().map(PathBuf::from).expect("one file written");
    let bytes = std::fs::read(&png).expect("the PNG exists");
    assert!(bytes.starts_with(b"\x89PNG"), "{} is not a PNG", png.display());
    // Same seed, same image: from the run's copies of its corpus's tokenizers, from the folder
    // the corpus was made with, and with the corpus moved away (the run keeps its vocabulary).
    assert_eq!(sample_seven("samples2", &["--tokenizers", &d(&tok)])["tokens"], summary["tokens"]);
    let moved = tmp.path().join("corpus-moved");
    std::fs::rename(&corpus, &moved).expect("move the corpus");
    assert_eq!(sample_seven("samples3", &[])["tokens"], summary["tokens"]);
    std::fs::rename(&moved, &corpus).expect("move the corpus back");
    // Text generation stops at EOS or the budget.
    let out = run_ok(&["sample", "--checkpoint", &d(&run), "--prompt", "In the", "--max-tokens", "8", "--json"]);
    let text: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(text["generated_tokens"].as_u64().is_some_and(|n| (1..=8 + 17).contains(&n)), "{text}");

    // docs/MODEL.md is enough to run a checkpoint elsewhere: the PyTorch model written from it
    // (scripts/reference/mot_model.py) gives every sampled token the log-probability motley
    // gave it — the MoT run above, one with the other norm placement, untied heads, no
    // QK-norm, and dense ones with another RoPE base, with and without QK-norm; image codes
    // and speech units go through their towers. The dense runs, exported with `motley export`,
    // give the same numbers in transformers itself (Qwen3ForCausalLM, LlamaForCausalLM).
    let variants: [(&str, &[&str]); 3] = [
        (
            "run-variant",
            &["--set", "model.norm=\"swin\"", "--set", "model.untie_head=true", "--set", "model.qk_norm=false"],
        ),
        ("run-dense", &["--arch", "dense", "--set", "model.rope_theta=500000.0"]),
        ("run-dense-llama", &["--arch", "dense", "--set", "model.qk_norm=false"]),
    ];
    let mut runs = vec![run.clone()];
    for (name, extra) in variants {
        let dir = tmp.path().join(name);
        let (data, out) = (d(&corpus), d(&dir));
        let mut args = vec!["train", "--preset", "tiny", "--data", &data, "--out", &out, "--steps", "4"];
        args.extend(["--set", "train.threads=1"]);
        args.extend(extra);
        run_ok(&args);
        runs.push(dir);
    }
    let py = std::env::var("MOTLEY_PYTHON").unwrap_or_else(|_| "python3".into());
    // Log-probabilities of each sequence's ids from its start on, by a reference script.
    let score = |script: &str, model: &Path, seqs: &[(Vec<String>, usize)]| -> (Vec<Vec<f64>>, serde_json::Value) {
        let mut c = Command::new(&py);
        c.arg(repo().join("scripts/reference").join(script)).arg(model);
        for (ids, from) in seqs {
            c.args(["--ids", &ids.join(","), "--score-from", &from.to_string()]);
        }
        let out = c.output().expect("run the reference");
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reference JSON");
        let f = |x: &serde_json::Value| x.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect::<Vec<_>>());
        let lp = v["logprobs"].as_array().map(|a| a.iter().filter_map(f).collect()).unwrap_or_default();
        (lp, v)
    };
    for r in &runs {
        let dense = r.file_name().is_some_and(|n| n.to_string_lossy().starts_with("run-dense"));
        let hf = tmp.path().join("hf").join(r.file_name().unwrap_or_default());
        if dense {
            run_ok(&["export", "--checkpoint", &d(r), "--out", &d(&hf)]);
        }
        // An image and a speech sample: their ids, the prompt's length, motley's log-probabilities.
        let mut seqs = Vec::new();
        let mut ours: Vec<Vec<f64>> = Vec::new();
        for kind in ["--image", "--speech"] {
            let out = run_ok(&[
                "sample",
                "--checkpoint",
                &d(r),
                "--prompt",
                "a handwritten digit",
                kind,
                "--max-tokens",
                "12",
                "--max-speech-units",
                "10",
                "--out",
                &d(&tmp.path().join("samples-ref")),
                "--device",
                "cpu",
                "--json",
            ]);
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sample --json prints JSON");
            let ids = |k: &str| s[k].as_array().map(|a| a.iter().filter_map(|v| v.as_u64()).collect::<Vec<_>>());
            let (prompt, tokens) = (ids("prompt_ids").expect("prompt_ids"), ids("tokens").expect("tokens"));
            let lp: Vec<f64> =
                s["logprobs"].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default();
            assert_eq!(lp.len(), tokens.len(), "{s}");
            seqs.push((prompt.iter().chain(&tokens).map(u64::to_string).collect::<Vec<_>>(), prompt.len()));
            ours.push(lp);
        }
        let mut references = vec![("mot_model.py", r.clone())];
        if dense {
            references.push(("transformers_logprobs.py", hf.clone()));
        }
        for (script, model) in references {
            let (theirs, v) = score(script, &model, &seqs);
            assert_eq!(theirs.len(), 2, "{v}");
            for (k, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(ours.len(), theirs.len(), "{v}");
                for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "{} sample {k} by {script}: token {i} ({}): motley {a}, reference {b}",
                        r.display(),
                        seqs[k].0[seqs[k].1 + i]
                    );
                }
            }
        }
    }
    // A MoT checkpoint has no transformers class: refused, saying what runs it instead.
    let out = motley().args(["export", "--checkpoint", &d(&run), "--out", &d(&tmp.path().join("hf-mot"))]).output();
    let out = out.expect("spawn motley");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("mot_model.py"), "{err}");

    // The Transfusion setting on the same subset: latent patches, diffusion loss, an image by
    // denoising. The latent tokenizer sits beside the VQ one, as in the demo.
    run_ok(&[
        "tokenizer",
        "fit-image",
        &d(&data.join("images")),
        "--kind",
        "latent",
        "--out",
        &d(&tok.join("image/latent.safetensors")),
        "--patch",
        "8",
        "--latent-dim",
        "4",
    ]);
    let recipe = std::fs::read_to_string(data.join("recipe.toml")).expect("recipe");
    std::fs::write(
        data.join("recipe-latent.toml"),
        recipe.replace("[options]\n", "[options]\nimage_mode = \"latent\"\n"),
    )
    .expect("write recipe");
    let latent_corpus = tmp.path().join("corpus-latent");
    run_ok(&[
        "ingest",
        "--config",
        &d(&data.join("recipe-latent.toml")),
        "--tokenizers",
        &d(&tok),
        "--out",
        &d(&latent_corpus),
        "--no-progress",
    ]);
    let tf_run = tmp.path().join("run-transfusion");
    run_ok(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        &d(&latent_corpus),
        "--out",
        &d(&tf_run),
        "--steps",
        "3",
        "--set",
        "train.threads=1",
    ]);
    let metrics = std::fs::read_to_string(tf_run.join("metrics.jsonl")).expect("metrics");
    assert!(metrics.contains("loss_diffusion"), "the Transfusion run logs its diffusion loss");
    for tokenizers in [None, Some(d(&tok))] {
        let mut args = vec![
            "sample".to_string(),
            "--checkpoint".into(),
            d(&tf_run),
            "--prompt".into(),
            "a handwritten digit seven".into(),
            "--image".into(),
            "--diffusion-steps".into(),
            "4".into(),
            "--out".into(),
            d(&tmp.path().join("samples-tf")),
            "--json".into(),
        ];
        if let Some(t) = tokenizers {
            args.extend(["--tokenizers".into(), t]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_ok(&refs);
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sample --json prints JSON");
        assert_eq!(summary["setting"], "transfusion", "{summary}");
        let png = summary["files"][0]["path"].as_str().map(PathBuf::from).expect("one file written");
        assert!(std::fs::read(&png).expect("the PNG exists").starts_with(b"\x89PNG"));
    }

    // A run directory that exists is never silently restarted.
    let again =
        motley().args(["train", "--preset", "tiny", "--data", &d(&corpus), "--out", &d(&run)]).output().expect("spawn");
    assert!(!again.status.success());
}

/// A pretrained diffusers AutoencoderKL (the tiny random one of the tokenizer parity fixtures)
/// through the whole Transfusion flow: imported as a tokenizer file, ingested from the model
/// folder itself, its factors in the manifest, stored latents decoded back to PNG, a few training
/// steps, and an image sampled and decoded through the VAE decoder.
#[test]
fn pretrained_vae_import_ingest_decode_train_sample() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    sample_subset(&data).expect("copy the sample subset");
    let tok = tmp.path().join("tok");
    let d = |p: &Path| p.display().to_string();
    let model = repo().join("tokenizers/tests/fixtures/pretrained/vae");

    let out = run_ok(&["tokenizer", "import", &d(&model), "--out", &d(&tok.join("image/vae.safetensors")), "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("import --json prints JSON");
    assert_eq!(info["kind"], "autoencoder-kl", "{info}");
    assert_eq!((info["grid"][0].as_u64(), info["latent_dim"].as_u64()), (Some(2), Some(16)), "{info}");
    run_ok(&[
        "tokenizer",
        "train-text",
        &d(&data.join("text")),
        "--out",
        &d(&tok.join("text.json")),
        "--vocab-size",
        "512",
    ]);
    run_ok(&[
        "tokenizer",
        "fit-speech",
        &d(&data.join("speech")),
        "--out",
        &d(&tok.join("speech/units.safetensors")),
        "--units",
        "16",
        "--max-iter",
        "5",
    ]);
    // The recipe names the model folder directly; --tokenizers would find the imported file.
    let recipe = std::fs::read_to_string(data.join("recipe.toml")).expect("recipe");
    std::fs::write(
        data.join("recipe-vae.toml"),
        format!(
            "[tokenizers]\ntext = {:?}\nimage = {:?}\nspeech = {:?}\n\n{}",
            d(&tok.join("text.json")),
            d(&model),
            d(&tok.join("speech")),
            recipe.replace("[options]\n", "[options]\nimage_mode = \"latent\"\n")
        ),
    )
    .expect("write recipe");
    let corpus = tmp.path().join("corpus-vae");
    run_ok(&["ingest", "--config", &d(&data.join("recipe-vae.toml")), "--out", &d(&corpus), "--no-progress"]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corpus.join("manifest.json")).expect("manifest")).expect("JSON");
    let image = &manifest["tokenizers"]["image"];
    assert_eq!(image["kind"], "autoencoder-kl", "{manifest}");
    assert_eq!(image["file"], "tokenizers/image.safetensors");
    assert_eq!((image["scaling_factor"].as_f64(), image["shift_factor"].as_f64()), (Some(0.3611), Some(0.1159)));
    assert_eq!(
        manifest["vocab"]["modalities"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["modality"] == "image"))
            .map(|m| m["latent_dim"].clone()),
        Some(serde_json::json!(16)),
        "{manifest}"
    );
    run_ok(&["shards", "verify", &d(&corpus)]);

    // Stored latents back to pictures: the last document holding an image (interleaved documents
    // follow the text ones) decodes to a PNG.
    let png = decode_last_with(&corpus, &manifest, "image", &tmp.path().join("decoded"))
        .expect("no image in the last 20 documents");
    let img = image::open(&png).expect("a PNG");
    assert_eq!((img.width(), img.height()), (32, 32));

    let run = tmp.path().join("run-vae");
    run_ok(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        &d(&corpus),
        "--out",
        &d(&run),
        "--steps",
        "3",
        "--set",
        "train.threads=1",
    ]);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    assert!(metrics.contains("loss_diffusion"), "the Transfusion run logs its diffusion loss");
    let out = run_ok(&[
        "sample",
        "--checkpoint",
        &d(&run),
        "--prompt",
        "a handwritten digit seven",
        "--image",
        "--diffusion-steps",
        "4",
        "--out",
        &d(&tmp.path().join("samples-vae")),
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sample --json prints JSON");
    assert_eq!(summary["setting"], "transfusion", "{summary}");
    let png = summary["files"][0]["path"].as_str().map(PathBuf::from).expect("one file written");
    let img = image::open(&png).expect("the sampled PNG");
    assert_eq!((img.width(), img.height()), (32, 32));
}

/// A pretrained transformers MimiModel (the tiny random one of the tokenizer parity fixtures)
/// through the speech flow: imported as a tokenizer file, ingested from the model folder itself
/// (speech with transcripts), its codebooks and token order in the manifest, stored codes
/// decoded back to WAV, a few training steps, and speech sampled and decoded through Mimi.
#[test]
fn pretrained_mimi_import_ingest_decode_train_sample() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let src = repo().join("data/sample");
    std::fs::create_dir_all(data.join("speech")).expect("mkdir");
    std::fs::create_dir_all(data.join("text")).expect("mkdir");
    let lines: Vec<String> = std::fs::read_to_string(src.join("speech.jsonl"))
        .expect("speech.jsonl")
        .lines()
        .step_by(4)
        .take(24)
        .map(str::to_string)
        .collect();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        let rel = v["audio"].as_str().expect("audio");
        std::fs::copy(src.join(rel), data.join(rel)).expect("copy clip");
    }
    std::fs::write(data.join("speech.jsonl"), lines.join("\n") + "\n").expect("write");
    let kjv = std::fs::read_to_string(src.join("text/kjv.txt")).expect("kjv");
    std::fs::write(data.join("text/kjv.txt"), &kjv[..kjv.char_indices().nth(60_000).map_or(kjv.len(), |(i, _)| i)])
        .expect("write");
    let tok = tmp.path().join("tok");
    let d = |p: &Path| p.display().to_string();
    let model = repo().join("tokenizers/tests/fixtures/pretrained/mimi");

    let out = run_ok(&["tokenizer", "import", &d(&model), "--out", &d(&tok.join("mimi.safetensors")), "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("import --json prints JSON");
    assert_eq!(info["kind"], "mimi", "{info}");
    assert_eq!((info["codebooks"].as_u64(), info["vocab_size"].as_u64()), (Some(4), Some(256)), "{info}");
    assert_eq!(info["tokens_per_second"].as_f64(), Some(50.0), "{info}");
    run_ok(&[
        "tokenizer",
        "train-text",
        &d(&data.join("text")),
        "--out",
        &d(&tok.join("text.json")),
        "--vocab-size",
        "512",
    ]);
    std::fs::write(
        data.join("recipe.toml"),
        format!(
            "[tokenizers]\ntext = {:?}\nspeech = {:?}\n\n[options]\nseed = 0\nmax_text_bytes = 2048\n\n\
             [[source]]\nname = \"text\"\nkind = \"text\"\npaths = [\"text/*.txt\"]\n\n\
             [[source]]\nname = \"speech\"\nkind = \"speech\"\npaths = [\"speech.jsonl\"]\naudio_field = \"audio\"\n\
             text_field = \"transcript\"\nspeech_mode = \"interleaved\"\ntext_first = 0.5\n",
            d(&tok.join("text.json")),
            d(&model),
        ),
    )
    .expect("write recipe");
    let corpus = tmp.path().join("corpus-mimi");
    run_ok(&["ingest", "--config", &d(&data.join("recipe.toml")), "--out", &d(&corpus), "--no-progress"]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corpus.join("manifest.json")).expect("manifest")).expect("JSON");
    let speech = &manifest["tokenizers"]["speech"];
    assert_eq!((speech["kind"].as_str(), speech["codebooks"].as_u64()), (Some("mimi"), Some(4)), "{manifest}");
    assert_eq!(speech["file"], "tokenizers/speech.safetensors");
    let vocab = manifest["vocab"]["modalities"].as_array().and_then(|m| m.iter().find(|m| m["modality"] == "speech"));
    assert_eq!(vocab.map(|m| m["vocab_size"].clone()), Some(serde_json::json!(256)), "{manifest}");
    run_ok(&["shards", "verify", &d(&corpus)]);

    // Stored codes back to audio: the last documents are the speech ones.
    let wav = decode_last_with(&corpus, &manifest, "speech", &tmp.path().join("decoded"))
        .expect("no speech in the last 20 documents");
    let r = hound::WavReader::open(&wav).expect("a WAV");
    assert_eq!(r.spec().sample_rate, 24_000);
    assert!(r.len() > 0 && r.len().is_multiple_of(1920), "whole Mimi frames: {} samples", r.len());

    let run = tmp.path().join("run-mimi");
    run_ok(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        &d(&corpus),
        "--out",
        &d(&run),
        "--steps",
        "3",
        "--set",
        "train.threads=1",
    ]);
    let out = run_ok(&[
        "sample",
        "--checkpoint",
        &d(&run),
        "--prompt",
        "seven",
        "--speech",
        "--max-speech-units",
        "16",
        "--out",
        &d(&tmp.path().join("samples-mimi")),
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sample --json prints JSON");
    let wav = summary["files"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["modality"] == "speech")
        .and_then(|f| f["path"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no speech file written: {summary}"));
    let r = hound::WavReader::open(&wav).expect("the sampled WAV");
    assert_eq!(r.spec().sample_rate, 24_000);
    // At most 16 ids: at most 4 whole frames of 4 codebooks (a partial frame is dropped).
    assert!(r.len() % 1920 == 0 && r.len() <= 4 * 1920, "{} samples", r.len());
}
