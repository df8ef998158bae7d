//! Golden CPU loss curve: the first steps of a seeded tiny MoT run on synthetic data.
//!
//! The expected values live in `golden/tiny_mot_cpu.json`. To regenerate them after an
//! intended change to the model, optimizer or synthetic data, run
//! `MOTLEY_BLESS=1 cargo test -p motley-trainer --test golden` and commit the file.

mod common;

use motley_trainer::Trainer;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/tiny_mot_cpu.json");
/// Relative tolerance: CPU kernels may differ in the last bits across libtorch builds and
/// thread counts, a real change moves the curve by far more.
const RTOL: f64 = 2e-3;

#[test]
fn tiny_mot_cpu_loss_curve_matches_golden() -> anyhow::Result<()> {
    let mut cfg = common::tiny_cfg();
    cfg.train.steps = 8;
    cfg.train.eval_every = 0;
    let dir = tempfile::tempdir()?;
    let mut t = Trainer::new(cfg)?;
    t.verbose = false;
    t.attach_run_dir(dir.path())?;
    t.run()?;
    let curve: Vec<[f64; 4]> = t
        .records()
        .iter()
        .map(|r| {
            let m = r.per_modality();
            [r.loss.unwrap_or(f64::NAN), m[0].unwrap_or(f64::NAN), m[1].unwrap_or(f64::NAN), m[2].unwrap_or(f64::NAN)]
        })
        .collect();
    if std::env::var_os("MOTLEY_BLESS").is_some() {
        std::fs::create_dir_all(std::path::Path::new(GOLDEN).parent().expect("golden dir"))?;
        let json = serde_json::json!({
            "what": "tiny MoT (d32, 2 layers) on synthetic data, CPU fp32, seed 0: [loss, text, image, speech] per step",
            "curve": curve,
        });
        std::fs::write(GOLDEN, serde_json::to_string_pretty(&json)? + "\n")?;
        return Ok(());
    }
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(GOLDEN)?)?;
    let expected: Vec<[f64; 4]> = serde_json::from_value(golden["curve"].clone())?;
    assert_eq!(curve.len(), expected.len());
    for (step, (got, want)) in curve.iter().zip(&expected).enumerate() {
        for k in 0..4 {
            let ok = (got[k] - want[k]).abs() <= RTOL * want[k].abs();
            assert!(ok, "step {}: value {k} is {} but golden says {}", step + 1, got[k], want[k]);
        }
    }
    // The curve must also be going somewhere: a golden file of a broken optimizer would not.
    assert!(expected[expected.len() - 1][0] < expected[0][0]);
    Ok(())
}
