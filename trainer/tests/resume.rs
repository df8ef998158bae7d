//! Exact resume: on CPU, the loss curve after a resume equals the uninterrupted one, bit for bit.

mod common;

use motley_trainer::config::CheckpointFormat;
use motley_trainer::per_rank::{self, Stored};
use motley_trainer::{Trainer, checkpoint, loader};

/// Step, loss, per-modality train losses and per-modality eval losses of one log line.
type LossRow = (u64, Option<f64>, [Option<f64>; 3], Option<[Option<f64>; 3]>);

fn losses(t: &Trainer) -> Vec<LossRow> {
    t.records().iter().map(|r| (r.step, r.loss, r.per_modality(), r.eval.as_ref().map(|e| e.per_modality()))).collect()
}

fn check_resume(cfg: motley_trainer::TrainConfig) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Uninterrupted: 6 steps.
    let mut a = Trainer::new(cfg.clone())?;
    a.verbose = false;
    a.attach_run_dir(&dir.path().join("a"))?;
    a.run()?;
    // Interrupted after the step-3 checkpoint (the trainer is dropped mid-run), then resumed.
    let run_b = dir.path().join("b");
    {
        let mut b = Trainer::new(cfg)?;
        b.verbose = false;
        b.attach_run_dir(&run_b)?;
        for _ in 0..3 {
            b.train_step()?;
        }
        b.save_checkpoint()?;
        b.wait_for_checkpoint()?; // `checkpoint_async`: on disk before the trainer goes
        b.train_step()?; // lost work: not checkpointed
    }
    let mut c = Trainer::resume(&run_b, &[])?;
    c.verbose = false;
    assert_eq!(c.step, 3);
    c.run()?;
    let (la, lc) = (losses(&a), losses(&c));
    assert_eq!(la.len(), 6);
    assert_eq!(&la[3..], &lc[..], "resumed curve differs");
    Ok(())
}

#[test]
fn resume_is_bit_exact_with_synthetic_source() -> anyhow::Result<()> {
    check_resume(common::tiny_cfg())
}

#[test]
fn resume_is_bit_exact_with_the_shard_loader_and_accumulation() -> anyhow::Result<()> {
    let corpus = tempfile::tempdir()?;
    loader::write_synthetic_corpus(corpus.path(), 400, 11)?;
    let mut cfg = common::tiny_cfg();
    cfg.data.synthetic = false;
    cfg.data.paths = vec![corpus.path().to_path_buf()];
    cfg.data.eval_fraction = 0.1;
    cfg.optim.grad_accum = 2;
    check_resume(cfg)
}

#[test]
fn resume_is_bit_exact_with_latent_images() -> anyhow::Result<()> {
    // Transfusion setting: the diffusion noise and timesteps are drawn from (seed, step), so
    // the diffusion loss and its timestep buckets resume bit for bit as well.
    let corpus = tempfile::tempdir()?;
    loader::write_synthetic_corpus_latent(corpus.path(), 300, 11, 6)?;
    let mut cfg = common::tiny_cfg();
    cfg.data.synthetic = false;
    cfg.data.paths = vec![corpus.path().to_path_buf()];
    cfg.data.eval_fraction = 0.1;
    let dir = tempfile::tempdir()?;
    type DiffusionRow = (Option<f64>, Vec<Option<f64>>, Option<f64>);
    let diffusion = |t: &Trainer| -> Vec<DiffusionRow> {
        t.records()
            .iter()
            .map(|r| (r.loss_diffusion, r.diffusion_buckets.clone(), r.eval.as_ref().and_then(|e| e.diffusion)))
            .collect()
    };
    let mut a = Trainer::new(cfg.clone())?;
    a.verbose = false;
    a.attach_run_dir(&dir.path().join("a"))?;
    a.run()?;
    assert!(diffusion(&a).iter().all(|d| d.0.is_some()), "every step has a diffusion loss");
    check_resume(cfg.clone())?;
    let run_b = dir.path().join("b");
    {
        let mut b = Trainer::new(cfg)?;
        b.verbose = false;
        b.attach_run_dir(&run_b)?;
        for _ in 0..3 {
            b.train_step()?;
        }
        b.save_checkpoint()?;
    }
    let mut c = Trainer::resume(&run_b, &[])?;
    c.verbose = false;
    c.run()?;
    assert_eq!(&diffusion(&a)[3..], &diffusion(&c)[..], "resumed diffusion losses differ");
    Ok(())
}

#[test]
fn resume_is_bit_exact_from_per_rank_checkpoints_written_in_line_or_in_the_background() -> anyhow::Result<()> {
    for background in [false, true] {
        let mut cfg = common::tiny_cfg();
        cfg.train.checkpoint_format = CheckpointFormat::PerRank;
        cfg.train.checkpoint_async = background;
        check_resume(cfg)?;
    }
    Ok(())
}

#[test]
fn a_per_rank_checkpoint_holds_the_full_checkpoint_s_tensors_bit_for_bit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut dirs = Vec::new();
    for (name, format) in [("full", CheckpointFormat::Full), ("per-rank", CheckpointFormat::PerRank)] {
        let mut cfg = common::tiny_cfg();
        cfg.train.checkpoint_format = format;
        let mut t = Trainer::new(cfg)?;
        t.verbose = false;
        t.attach_run_dir(&dir.path().join(name))?;
        t.run()?;
        dirs.push(checkpoint::resolve(&dir.path().join(name))?);
    }
    let (full, ranked) = (&dirs[0], &dirs[1]);
    assert!(ranked.join(per_rank::INDEX_FILE).exists() && ranked.join(per_rank::model_file(0, 1)).exists());
    assert!(!ranked.join(checkpoint::MODEL_FILE).exists());
    // Eval, sample and export read weights through read_model; resume through Stored.
    let (a, b) = (checkpoint::read_model(full)?, checkpoint::read_model(ranked)?);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k}");
    }
    assert_eq!(checkpoint::stored_params(full)?, checkpoint::stored_params(ranked)?);
    let (x, y) = (Stored::open(full, true)?, Stored::open(ranked, true)?);
    assert_eq!(x.names().collect::<Vec<_>>(), y.names().collect::<Vec<_>>());
    for k in x.names() {
        assert!(x.read(k)?.equal(&y.read(k)?), "{k}");
    }
    // Consolidated into the whole-tensor format: the full checkpoint's files, tensor for tensor.
    let whole = dir.path().join("consolidated");
    let c = checkpoint::consolidate(ranked, &whole, 5000.0)?;
    assert_eq!((c.step, c.source_world), (6, Some(1)));
    for f in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE] {
        let (x, y) = (checkpoint::read_tensors(&full.join(f))?, checkpoint::read_tensors(&whole.join(f))?);
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{f}");
        for (k, t) in &x {
            assert!(t.equal(&y[k]), "{f}: {k}");
        }
    }
    assert!(checkpoint::consolidate(ranked, &whole, 5000.0).is_err(), "an existing checkpoint is not overwritten");
    // A piece missing from a rank's file, or a file missing, is named.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken)?;
    for e in std::fs::read_dir(ranked)? {
        let e = e?;
        std::fs::copy(e.path(), broken.join(e.file_name()))?;
    }
    let index: per_rank::RankIndex =
        serde_json::from_str(&std::fs::read_to_string(broken.join(per_rank::INDEX_FILE))?)?;
    let mut edited = index.clone();
    let first = edited.tensors.values_mut().next().expect("a tensor");
    first.pieces[0][2] -= 1;
    std::fs::write(broken.join(per_rank::INDEX_FILE), serde_json::to_vec(&edited)?)?;
    let e = Stored::open(&broken, true).expect_err("a short piece").to_string();
    assert!(e.contains(per_rank::INDEX_FILE), "{e}");
    std::fs::write(broken.join(per_rank::INDEX_FILE), serde_json::to_vec(&index)?)?;
    std::fs::remove_file(broken.join(per_rank::optimizer_file(0, 1)))?;
    // (Trainer is not Debug, so no expect_err.)
    let e = Trainer::resume(&broken, &[]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains(&per_rank::optimizer_file(0, 1)) && e.contains("every node"), "{e}");
    Ok(())
}
