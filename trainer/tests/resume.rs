//! Exact resume: on CPU, the loss curve after a resume equals the uninterrupted one, bit for bit.

mod common;

use motley_trainer::{Trainer, loader};

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
