//! Shared helpers for the trainer's integration tests: a tiny CPU configuration.

#![allow(dead_code)]

use motley_trainer::TrainConfig;

/// A model small enough to take a step in milliseconds on one CPU core.
pub fn tiny_cfg() -> TrainConfig {
    let mut c = TrainConfig::preset("tiny").expect("tiny preset");
    c.model.d_model = 32;
    c.model.n_layers = 2;
    c.model.n_heads = 4;
    c.model.ffn_multiple_of = 16;
    c.data.synthetic = true;
    c.data.seq_len = 64;
    c.data.batch_size = 4;
    c.optim.warmup_steps = 2;
    c.train.steps = 6;
    c.train.log_every = 1;
    c.train.eval_every = 3;
    c.train.eval_batches = 1;
    c.train.checkpoint_every = 3;
    c.train.device = "cpu".into();
    // One intra-op thread: tests run side by side, and OpenMP spin-waits badly when
    // threads outnumber free cores.
    c.train.threads = 1;
    c
}
