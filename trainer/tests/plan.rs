//! `motley plan` against what a real training step allocates on CPU: the plan's activation and
//! loss bytes within 15 % of the peak `ops::track_memory` measures over a forward + backward,
//! for MoT and dense, with and without activation checkpointing and a chunked loss.

use motley_trainer::data::{BatchSource, SyntheticSource};
use motley_trainer::model::{Arch, Model, Prepared, Routing};
use motley_trainer::plan::{Target, plan};
use motley_trainer::{TrainConfig, ops, tch};

fn measured_step_peak(cfg: &TrainConfig) -> anyhow::Result<f64> {
    tch::set_num_threads(1);
    let mut src = SyntheticSource::new(3, cfg.data.batch_size, cfg.data.seq_len);
    let batch = src.next_batch()?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let mut model = Model::new_seeded(&vs.root(), &cfg.model, 1)?;
    model.set_activation_checkpointing(cfg.train.activation_checkpointing.every());
    let p = Prepared::new(&cfg.model, &batch, Routing::Sorted, tch::Device::Cpu)?;
    // A first step allocates the gradients (the plan counts them with the weights).
    model.loss(&p).loss.backward();
    let ((), span) = ops::track_memory(|| {
        let out = model.loss(&p);
        out.loss.backward();
    })?;
    Ok(span.peak as f64)
}

#[test]
fn the_plan_predicts_a_step_s_peak_bytes_within_15_percent() -> anyhow::Result<()> {
    let vocab = i64::from(SyntheticSource::new(0, 1, 2).vocab().total_size);
    for (arch, d, layers, batch, seq, ckpt, chunk) in [
        (Arch::Mot, 64, 3, 2, 128, false, 0),
        (Arch::Mot, 128, 2, 4, 64, false, 0),
        (Arch::Dense, 96, 3, 2, 128, false, 0),
        (Arch::Mot, 64, 4, 2, 128, true, 0),
        (Arch::Mot, 64, 3, 2, 128, false, 32),
    ] {
        let mut cfg = TrainConfig::preset("tiny")?;
        cfg.model.arch = arch;
        cfg.model.vocab_size = vocab * 16; // a head big enough to matter
        cfg.model.d_model = d;
        cfg.model.n_layers = layers;
        cfg.model.n_heads = 4;
        cfg.model.ffn_multiple_of = 16;
        cfg.model.ce_chunk_rows = chunk;
        cfg.data.batch_size = batch;
        cfg.data.seq_len = seq;
        cfg.train.activation_checkpointing = motley_trainer::config::Checkpointing::All(ckpt);
        let predicted = {
            let p = plan(&cfg, 1, 1e12, Target::Cpu, 0);
            p.bytes.activations + p.bytes.loss
        };
        let measured = measured_step_peak(&cfg)?;
        let err = (predicted - measured).abs() / measured;
        assert!(
            err <= 0.15,
            "{arch} d{d} L{layers} B{batch} T{seq} ckpt={ckpt} chunk={chunk}: planned {predicted:.0} bytes, \
             measured {measured:.0} ({:.1} % off)",
            err * 100.0
        );
    }
    Ok(())
}
