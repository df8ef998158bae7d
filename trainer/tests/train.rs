//! Training behaviour: losses fall per modality, guards against silent mistakes, NaN handling,
//! the hook that copies checkpoints elsewhere (pinning, failure), the profiler window and
//! TensorBoard events.

mod common;

use motley_trainer::config::OnNonFinite;
use motley_trainer::train::prepare_run_dir;
use motley_trainer::{Arch, TrainError, Trainer, checkpoint, evaluate_checkpoint};

#[test]
fn every_modality_loss_falls_for_mot_dense_and_moe() -> anyhow::Result<()> {
    for arch in [Arch::Mot, Arch::Dense, Arch::Moe] {
        let mut cfg = common::tiny_cfg();
        cfg.model.arch = arch;
        cfg.train.steps = 30;
        cfg.train.eval_every = 0;
        let dir = tempfile::tempdir()?;
        let mut t = Trainer::new(cfg)?;
        t.verbose = false;
        t.attach_run_dir(dir.path())?;
        let summary = t.run()?;
        let first = t.records()[0].per_modality();
        for (m, (a, b)) in first.iter().zip(&summary.final_train).enumerate() {
            let (a, b) = (a.expect("first loss"), b.expect("final loss"));
            assert!(b < a - 0.5, "{arch}: modality {m} loss {a} -> {b}");
        }
        let eval = summary.final_eval.expect("final eval");
        assert!(eval.tokens.iter().all(|&n| n > 0));
        assert!(dir.path().join("losses.png").exists());
        assert!(dir.path().join("config.toml").exists());
        let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl"))?;
        assert_eq!(lines.lines().count(), 30);
        // `motley eval` path: the checkpoint gives the same held-out loss as the run's last eval.
        let (step, r) = evaluate_checkpoint(dir.path(), None, 1, motley_shards::Split::Eval, "cpu")?;
        assert_eq!(step, 30);
        assert_eq!(r.per_modality(), eval.per_modality());
    }
    Ok(())
}

#[test]
fn guards_against_silent_mistakes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A missing corpus is an error, never a fresh start on nothing.
    let mut cfg = common::tiny_cfg();
    cfg.data.synthetic = false;
    cfg.data.paths = vec![dir.path().join("no-such-corpus")];
    let e = Trainer::new(cfg).expect_err("missing corpus");
    assert!(e.to_string().contains("no-such-corpus"), "{e}");
    // No data at all.
    let mut cfg = common::tiny_cfg();
    cfg.data.synthetic = false;
    assert!(matches!(Trainer::new(cfg), Err(TrainError::Config { .. })));
    // An existing run directory needs --resume or --overwrite.
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run)?;
    std::fs::write(run.join("metrics.jsonl"), "")?;
    assert!(matches!(prepare_run_dir(&run, false), Err(TrainError::RunDir { .. })));
    prepare_run_dir(&run, true)?;
    // Resuming a run without checkpoints is an error.
    assert!(matches!(Trainer::resume(&run, &[]), Err(TrainError::Checkpoint { .. })));
    assert!(Trainer::resume(&dir.path().join("nope"), &[]).is_err());
    Ok(())
}

#[test]
fn resume_refuses_model_changes_and_checkpoints_are_pruned() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = common::tiny_cfg();
    cfg.train.checkpoint_every = 1;
    cfg.train.keep_checkpoints = 2;
    cfg.train.steps = 4;
    let mut t = Trainer::new(cfg)?;
    t.verbose = false;
    t.attach_run_dir(dir.path())?;
    t.run()?;
    let kept: Vec<(u64, std::path::PathBuf)> = checkpoint::list(dir.path())?;
    assert_eq!(kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![3, 4]);
    // Weights and moments are stored per tower under self-describing names, whatever the
    // in-memory layout (one stacked tensor per site).
    let ckpt = &kept[1].1;
    let weights = checkpoint::read_tensors(&ckpt.join(checkpoint::MODEL_FILE))?;
    let d = 32;
    assert_eq!(weights["layers.1.attn.k_proj.image.weight"].size(), [d, d]);
    assert_eq!(weights["layers.0.attn_norm.speech.weight"].size(), [d]);
    assert!(weights.keys().all(|n| n.ends_with(".weight") && !n.contains("stacked")), "{:?}", weights.keys());
    let moments = checkpoint::read_tensors(&ckpt.join(checkpoint::OPTIMIZER_FILE))?;
    assert_eq!(moments.len(), 2 * weights.len());
    assert!(moments.contains_key("layers.1.ffn.up_proj.text.weight.exp_avg_sq"));
    let steps = checkpoint::read_meta(ckpt)?.optimizer_steps;
    assert_eq!(steps.get("layers.0.attn.v_proj.speech.weight"), Some(&4));
    assert!(Trainer::resume(dir.path(), &["model.d_model=64".into()]).is_err());
    let mut more = Trainer::resume(dir.path(), &["train.steps=5".into()])?;
    more.verbose = false;
    assert_eq!(more.run()?.steps, 5);

    // A meta.json whose model is not the stored one (edited, or from another run) is refused
    // before the model is built: a vocab_size of 2^32 - 1 once made tch panic allocating 550 GB.
    let ckpt = checkpoint::resolve(dir.path())?;
    let meta_path = ckpt.join(checkpoint::META_FILE);
    let original = std::fs::read(&meta_path)?;
    let mut meta: serde_json::Value = serde_json::from_slice(&original)?;
    for vocab in [4_294_967_295i64, meta["config"]["model"]["vocab_size"].as_i64().unwrap_or(0) + 1] {
        meta["config"]["model"]["vocab_size"] = vocab.into();
        std::fs::write(&meta_path, serde_json::to_vec(&meta)?)?;
        let e = motley_trainer::sample::load_run(dir.path(), "cpu", None).expect_err("edited meta").to_string();
        assert!(e.contains("meta.json") && e.contains("parameters") && e.contains("model.safetensors"), "{e}");
        assert!(Trainer::resume(dir.path(), &[]).is_err());
    }
    // Counters the resumed run increments or feeds to AdamW: 2^64-1 once overflowed.
    let edits: [(&str, serde_json::Value, &str); 4] = [
        ("/step", u64::MAX.into(), "step"),
        ("/skipped", 6.into(), "skipped"),
        ("/optimizer_steps/layers.0.attn.v_proj.speech.weight", (-1).into(), "optimizer_steps"),
        ("/optimizer_steps/layers.0.attn.v_proj.speech.weight", 6.into(), "optimizer_steps"),
    ];
    for (pointer, value, key) in edits {
        let mut meta: serde_json::Value = serde_json::from_slice(&original)?;
        *meta.pointer_mut(pointer).ok_or_else(|| anyhow::anyhow!("no {pointer}"))? = value;
        std::fs::write(&meta_path, serde_json::to_vec(&meta)?)?;
        let e = Trainer::resume(dir.path(), &[]).err().ok_or_else(|| anyhow::anyhow!("{pointer} resumed"))?.to_string();
        assert!(e.contains("meta.json") && e.contains(key), "{pointer}: {e}");
    }
    let mut meta: serde_json::Value = serde_json::from_slice(&original)?;
    meta["optimizer_steps"]["layers.9.attn.v_proj.speech.weight"] = 5.into();
    std::fs::write(&meta_path, serde_json::to_vec(&meta)?)?;
    let e = Trainer::resume(dir.path(), &[]).err().ok_or_else(|| anyhow::anyhow!("a stray step count resumed"))?;
    assert!(e.to_string().contains("optimizer_steps name layers.9"), "{e}");
    std::fs::write(&meta_path, &original)?;
    assert!(Trainer::resume(dir.path(), &[]).is_ok());

    // Weights and moments that are not finite floats (NaN once surfaced steps later as a NaN
    // loss naming no file; integers were truncated in silently) are refused, naming the tensor.
    let edit = |file: &str, name: &str, f: &dyn Fn(&tch::Tensor) -> tch::Tensor, key: &str| -> anyhow::Result<()> {
        let path = ckpt.join(file);
        let original = std::fs::read(&path)?;
        let mut tensors = checkpoint::read_tensors(&path)?;
        let t = tensors.get(name).ok_or_else(|| anyhow::anyhow!("no {name}"))?;
        tensors.insert(name.to_string(), f(t));
        tch::Tensor::write_safetensors(&tensors.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>(), &path)?;
        let e = Trainer::resume(dir.path(), &[]).err().ok_or_else(|| anyhow::anyhow!("{file} {name} resumed"))?;
        let e = e.to_string();
        assert!(e.contains(file) && e.contains(name) && e.contains(key), "{e}");
        std::fs::write(&path, original)?;
        Ok(())
    };
    let w = "layers.0.attn.q_proj.text.weight";
    edit(checkpoint::MODEL_FILE, w, &|t| t.full_like(f64::NAN), "NaN")?;
    edit(checkpoint::MODEL_FILE, w, &|t| t.to_kind(tch::Kind::Int64), "not floating point")?;
    edit(checkpoint::OPTIMIZER_FILE, &format!("{w}.exp_avg_sq"), &|t| -t - 1.0, "negative")?;
    // Moments of a tensor the model does not have (another model's state) are refused too.
    let path = ckpt.join(checkpoint::OPTIMIZER_FILE);
    let original = std::fs::read(&path)?;
    let mut tensors = checkpoint::read_tensors(&path)?;
    tensors.insert("layers.9.attn.q_proj.text.weight.exp_avg".into(), tch::Tensor::zeros([2], tch::kind::FLOAT_CPU));
    tch::Tensor::write_safetensors(&tensors.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>(), &path)?;
    let e = Trainer::resume(dir.path(), &[]).err().ok_or_else(|| anyhow::anyhow!("a stray moment resumed"))?;
    let e = e.to_string();
    assert!(e.contains(checkpoint::OPTIMIZER_FILE) && e.contains("unexpected optimizer tensor layers.9"), "{e}");
    std::fs::write(&path, original)?;
    assert!(Trainer::resume(dir.path(), &[]).is_ok());
    Ok(())
}

#[test]
fn non_finite_loss_stops_or_skips_and_never_corrupts_a_checkpoint() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = common::tiny_cfg();
    // An absurd learning rate without clipping blows the weights up after the first update.
    cfg.optim.lr = 1e30;
    cfg.optim.min_lr = 0.0;
    cfg.optim.warmup_steps = 0;
    cfg.optim.grad_clip = 0.0;
    cfg.train.checkpoint_every = 1;
    cfg.train.eval_every = 0;
    let mut t = Trainer::new(cfg.clone())?;
    t.verbose = false;
    t.attach_run_dir(&dir.path().join("stop"))?;
    let e = t.run().expect_err("must stop");
    let TrainError::NonFinite { step, .. } = e else { panic!("unexpected error {e}") };
    let good: Vec<u64> = checkpoint::list(&dir.path().join("stop"))?.into_iter().map(|(s, _)| s).collect();
    assert!(good.iter().all(|&s| s < step), "checkpoint written at or after the bad step");
    // Skip mode: counts, keeps going, and gives up after max_skipped in a row.
    cfg.train.on_nonfinite = OnNonFinite::Skip;
    cfg.train.max_skipped = 2;
    let mut t = Trainer::new(cfg)?;
    t.verbose = false;
    t.attach_run_dir(&dir.path().join("skip"))?;
    assert!(matches!(t.run(), Err(TrainError::NonFinite { .. })));
    assert!(t.records().iter().filter(|r| r.skipped).count() >= 2);
    Ok(())
}

#[test]
fn compare_mot_dense_reports_both() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = common::tiny_cfg();
    cfg.train.steps = 4;
    let c = motley_trainer::compare_mot_dense(&cfg, dir.path(), false, false)?;
    assert_eq!(c.runs.len(), 2);
    let table = c.table();
    assert!(table.contains("mot-dense") && table.contains("speech") && table.contains("held-out"), "{table}");
    Ok(())
}

#[test]
fn transfusion_text_and_diffusion_losses_fall_for_mot_and_dense() -> anyhow::Result<()> {
    let corpus = tempfile::tempdir()?;
    motley_trainer::loader::write_synthetic_corpus_latent(corpus.path(), 400, 3, 6)?;
    let mut cfg = common::tiny_cfg();
    cfg.data.synthetic = false;
    cfg.data.paths = vec![corpus.path().to_path_buf()];
    cfg.data.eval_fraction = 0.1;
    cfg.train.steps = 30;
    cfg.train.eval_every = 0;
    let dir = tempfile::tempdir()?;
    let c = motley_trainer::compare_mot_dense(&cfg, dir.path(), false, false)?;
    for (run, arch) in c.runs.iter().zip([Arch::Mot, Arch::Dense]) {
        let records: Vec<motley_trainer::metrics::StepRecord> =
            std::fs::read_to_string(dir.path().join(arch.to_string()).join("metrics.jsonl"))?
                .lines()
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()?;
        let (t0, d0) = (records[0].loss_text.expect("text loss"), records[0].loss_diffusion.expect("diffusion loss"));
        let (t1, d1) = (run.final_train[0].expect("final text"), run.final_diffusion.expect("final diffusion"));
        assert!(t1 < t0 - 0.5, "{arch}: text loss {t0} -> {t1}");
        assert!(d1 < d0 * 0.9, "{arch}: diffusion loss {d0} -> {d1}");
        assert_eq!(records[0].diffusion_buckets.len(), 4);
        assert!(run.final_eval.as_ref().and_then(|e| e.diffusion).is_some());
    }
    assert!(c.table().contains("diffusion"), "{}", c.table());
    Ok(())
}

/// A run keeps its corpus's vocabulary (in every checkpoint) and tokenizer files (in
/// RUN/tokenizers/), so it loads for sampling after the corpus is gone.
#[test]
fn a_run_keeps_its_vocabulary_and_tokenizers_when_the_corpus_is_gone() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let corpus = dir.path().join("corpus");
    motley_trainer::loader::write_synthetic_corpus(&corpus, 200, 5)?;
    // Tokenizer files as ingest records them: a path string, and a pretrained model's object.
    std::fs::create_dir_all(corpus.join("tokenizers"))?;
    std::fs::write(corpus.join("tokenizers/text.json"), b"{\"text\": 1}")?;
    std::fs::write(corpus.join("tokenizers/image.safetensors"), b"image bytes")?;
    let mut manifest = motley_shards::Manifest::read(&corpus)?;
    manifest.tokenizers.insert("text".into(), serde_json::json!("tokenizers/text.json"));
    manifest
        .tokenizers
        .insert("image".into(), serde_json::json!({"file": "tokenizers/image.safetensors", "kind": "autoencoder-kl"}));
    // Named but not there: nothing to copy, and no error.
    manifest.tokenizers.insert("speech".into(), serde_json::json!("tokenizers/speech.safetensors"));
    manifest.write(&corpus)?;
    let vocab = manifest.vocab.clone();

    let run = dir.path().join("run");
    let mut cfg = common::tiny_cfg();
    cfg.data.synthetic = false;
    cfg.data.paths = vec![corpus.clone()];
    cfg.train.steps = 3;
    let mut t = Trainer::new(cfg)?;
    t.verbose = false;
    t.attach_run_dir(&run)?;
    // A file of an earlier corpus in the same folder goes.
    std::fs::write(run.join("tokenizers/speech.safetensors"), b"stale")?;
    t.attach_run_dir(&run)?;
    t.run()?;
    let toks = run.join(checkpoint::TOKENIZERS_DIR);
    let mut names: Vec<String> = std::fs::read_dir(&toks)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    names.sort();
    assert_eq!(names, ["image.safetensors", "text.json"]);
    assert_eq!(std::fs::read(toks.join("image.safetensors"))?, b"image bytes");

    std::fs::remove_dir_all(&corpus)?;
    let loaded = motley_trainer::sample::load_run(&run, "cpu", None)?;
    assert_eq!(loaded.vocab, vocab);
    assert_eq!(loaded.tokenizers.as_deref(), Some(toks.as_path()));
    assert_eq!(std::fs::read(toks.join("text.json"))?, b"{\"text\": 1}", "the copy outlives the corpus");
    // Naming a corpus explicitly still reads its manifest (and fails clearly when it is gone).
    let err = motley_trainer::sample::load_run(&run, "cpu", Some(&corpus)).expect_err("corpus removed");
    assert!(err.to_string().contains("manifest"), "{err}");
    Ok(())
}

/// What a [`motley_trainer::mirror::RunMirror`] sees: the checkpoints on disk at each `saved`.
#[derive(Clone, Default)]
struct SlowMirror {
    first: std::sync::Arc<std::sync::Mutex<Option<std::path::PathBuf>>>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<u64>>>>,
    waited: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl motley_trainer::mirror::RunMirror for SlowMirror {
    /// Still copying the first checkpoint it was given, until the run waits for it.
    fn in_use(&self) -> Option<std::path::PathBuf> {
        self.first.lock().ok()?.clone().filter(|_| !self.waited.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn saved(&self, run: &std::path::Path, ckpt: &std::path::Path) -> Result<(), String> {
        let mut first = self.first.lock().map_err(|e| e.to_string())?;
        first.get_or_insert_with(|| ckpt.to_path_buf());
        let on_disk: Vec<u64> = checkpoint::list(run).map_err(|e| e.to_string())?.into_iter().map(|(s, _)| s).collect();
        let mut seen = self.seen.lock().map_err(|e| e.to_string())?;
        seen.push(on_disk);
        if seen.len() == 5 { Err("copying step 5: the bucket went away".into()) } else { Ok(()) }
    }

    fn put_run_file(&self, rel: &str, _path: &std::path::Path) -> Result<(), String> {
        Err(format!("this run writes no {rel}"))
    }

    fn wait(&self) -> Result<(), String> {
        self.waited.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn finish(&self, _run: &std::path::Path) -> Result<(), String> {
        Ok(())
    }
}

/// A checkpoint the mirror is still copying is not pruned under it (it goes once the run has
/// waited for the copy), and a copy's failure stops the run with its message while every
/// checkpoint written stays on disk.
#[test]
fn a_mirror_keeps_its_checkpoint_from_pruning_and_its_failure_stops_the_run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = common::tiny_cfg();
    cfg.train.checkpoint_every = 1;
    cfg.train.keep_checkpoints = 2;
    cfg.train.steps = 6;
    let mut t = Trainer::new(cfg)?;
    t.verbose = false;
    t.attach_run_dir(dir.path())?;
    let mirror = SlowMirror::default();
    t.set_mirror(Box::new(mirror.clone()));
    let err = t.run().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("the bucket went away"), "{err}");
    let seen = mirror.seen.lock().map_err(|e| anyhow::anyhow!("{e}"))?.clone();
    assert_eq!(seen, vec![vec![1], vec![1, 2], vec![1, 2, 3], vec![1, 3, 4], vec![1, 4, 5]]);
    let left: Vec<u64> = checkpoint::list(dir.path())?.into_iter().map(|(s, _)| s).collect();
    assert_eq!(left, vec![4, 5], "after the run waited for the copy, the pinned step 1 is pruned");
    Ok(())
}

/// `train.checkpoint_async` writes from host copies on a background thread: the checkpoints
/// hold exactly the bytes the synchronous path writes (weights, moments, loader state), the
/// same ones are pruned, and a run resumes from them.
#[test]
fn async_checkpoints_hold_the_bytes_of_sync_ones_and_resume() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let train = |name: &str, asynchronous: bool| -> anyhow::Result<std::path::PathBuf> {
        let mut cfg = common::tiny_cfg();
        cfg.train.checkpoint_every = 2;
        cfg.train.keep_checkpoints = 2;
        cfg.train.checkpoint_async = asynchronous;
        let run = dir.path().join(name);
        let mut t = Trainer::new(cfg)?;
        t.verbose = false;
        t.attach_run_dir(&run)?;
        let s = t.run()?;
        assert!(s.checkpoint_s > 0.0, "{s:?}");
        Ok(run)
    };
    let (sync, asynchronous) = (train("sync", false)?, train("async", true)?);
    let steps = |run: &std::path::Path| -> anyhow::Result<Vec<u64>> {
        Ok(checkpoint::list(run)?.into_iter().map(|(s, _)| s).collect())
    };
    assert_eq!(steps(&sync)?, vec![4, 6]);
    assert_eq!(steps(&asynchronous)?, vec![4, 6]);
    for step in [4, 6] {
        let (a, b) = (checkpoint::dir_of(&sync, step), checkpoint::dir_of(&asynchronous, step));
        for f in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE] {
            assert!(std::fs::read(a.join(f))? == std::fs::read(b.join(f))?, "step {step} {f} differs");
        }
        let meta = |d: &std::path::Path| -> anyhow::Result<serde_json::Value> {
            let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join(checkpoint::META_FILE))?)?;
            v["config"]["train"]["checkpoint_async"] = serde_json::Value::Null;
            Ok(v)
        };
        assert_eq!(meta(&a)?, meta(&b)?, "step {step} meta.json differs beyond checkpoint_async");
    }
    let mut more = Trainer::resume(&asynchronous, &["train.steps=8".into()])?;
    more.verbose = false;
    assert_eq!(more.run()?.steps, 8);
    assert_eq!(steps(&asynchronous)?, vec![6, 8]);
    Ok(())
}

/// `train.profile_steps` records exactly those steps with torch's profiler: a Chrome trace
/// with one `ProfilerStep#N` per step, the ATen operators with their input shapes, and
/// motley's phases; the loss curve is the one an unprofiled run draws.
#[test]
fn profile_steps_write_a_torch_trace_of_those_steps_and_change_no_loss() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let train = |name: &str, profile: Vec<u64>| -> anyhow::Result<Vec<Option<f64>>> {
        let mut cfg = common::tiny_cfg();
        cfg.train.steps = 4;
        cfg.train.eval_every = 3;
        cfg.train.profile_steps = profile;
        let mut t = Trainer::new(cfg)?;
        t.verbose = false;
        t.attach_run_dir(&dir.path().join(name))?;
        t.run()?;
        Ok(t.records().iter().map(|r| r.loss).collect())
    };
    let plain = train("plain", vec![])?;
    let profiled = train("profiled", vec![2, 3])?;
    assert_eq!(plain, profiled, "profiling changed the losses");
    assert!(!dir.path().join("plain/profile").exists());
    let trace = dir.path().join("profiled/profile/steps-2-3/rank-00000.pt.trace.json");
    let s = motley_trainer::profile::summarize(&trace)?;
    assert_eq!(s.steps.iter().map(|t| t.step).collect::<Vec<_>>(), [2, 3], "{s:?}");
    assert!(s.ops.iter().any(|o| o.name.starts_with("aten::") && o.self_ms > 0.0), "{}", s.table(10));
    let phases: Vec<&str> = s.ranges.iter().map(|p| p.name.as_str()).collect();
    for p in ["motley::data", "motley::forward", "motley::backward", "motley::optimizer", "motley::eval"] {
        assert!(phases.contains(&p), "{p} missing from {phases:?}");
    }
    // record_shapes: operators carry their input dimensions, as torch.profiler's do.
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace)?)?;
    let events = v["traceEvents"].as_array().expect("events");
    assert!(events.iter().any(|e| e["cat"] == "cpu_op" && e["args"]["Input Dims"].is_array()));
    // A window the run never reaches writes nothing; a bad one is refused.
    train("late", vec![9, 10])?;
    assert!(!dir.path().join("late/profile/steps-9-10").exists());
    let err = train("bad", vec![3, 2]).expect_err("first > last").to_string();
    assert!(err.contains("train.profile_steps"), "{err}");
    Ok(())
}

/// A python with TensorBoard: `$MOTLEY_PYTHON` (the test command sets it), else the
/// repository's `.venv` (scripts/setup installs TensorBoard's reader there).
fn python() -> std::path::PathBuf {
    std::env::var_os("MOTLEY_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// `train.tensorboard`: TensorBoard's own reader finds each step's losses, learning rate and
/// held-out losses as `metrics.jsonl` has them, and a run resumed from an earlier checkpoint
/// replaces the steps it trains again (one value per step, not two).
#[test]
fn tensorboard_events_read_back_with_tensorboard_as_the_metrics_log() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let mut cfg = common::tiny_cfg();
    cfg.train.tensorboard = true;
    let mut t = Trainer::new(cfg)?;
    t.verbose = false;
    t.attach_run_dir(&run)?;
    t.run()?;
    // Back to step 3: steps 4-6 are trained and logged again, in a second event file.
    std::fs::remove_dir_all(checkpoint::dir_of(&run, 6))?;
    let mut t = Trainer::resume(&run, &[])?;
    t.verbose = false;
    t.run()?;
    assert_eq!(std::fs::read_dir(run.join("tensorboard"))?.count(), 2, "one event file per process");

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/reference/tensorboard_scalars.py");
    let out = std::process::Command::new(python()).arg(&script).arg(run.join("tensorboard")).output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tb: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(records.len(), 6);
    for (tag, pointer) in [
        ("train/loss", "/loss"),
        ("train/loss_text", "/loss_text"),
        ("train/loss_speech", "/loss_speech"),
        ("optim/lr", "/lr"),
        ("optim/grad_norm", "/grad_norm"),
        ("eval/loss_image", "/eval/image"),
    ] {
        let want: Vec<(u64, f64)> =
            records.iter().filter_map(|r| Some((r["step"].as_u64()?, r.pointer(pointer)?.as_f64()?))).collect();
        let got: Vec<(u64, f64)> = tb[tag]
            .as_array()
            .unwrap_or(&Vec::new())
            .iter()
            .filter_map(|p| Some((p[0].as_u64()?, p[1].as_f64()?)))
            .collect();
        assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), want.iter().map(|p| p.0).collect::<Vec<_>>(), "{tag}");
        for ((step, g), (_, w)) in got.iter().zip(&want) {
            // TensorBoard scalars are f32.
            assert!((g - w).abs() <= 1e-6 * w.abs() + 1e-12, "{tag} at step {step}: {g} vs {w}");
        }
    }
    assert_eq!(tb["eval/loss_image"].as_array().map(Vec::len), Some(2), "evaluations at steps 3 and 6: {tb}");
    Ok(())
}
