//! Integration tests of the benchmarks at toy sizes: `motley bench trainer` (the report's
//! fields are there and consistent — timings are not checked, no thresholds in tests — the
//! operator counts come from real dispatches, and the PyTorch reference script runs on the same
//! batch), `motley bench ingest --webdataset` (every sample read on both sides) and `motley
//! bench checkpoint` (both modes, and both formats on two ranks, write the same checkpoints).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

#[test]
fn bench_trainer_reports_ratios_and_operator_counts() -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench/mot_torch.py");
    let mut args: Vec<String> = "--json bench trainer --device cpu --d-model 32 --layers 2 --heads 2 --seq 128 --batch 2 --text-vocab 64 --steps 1 --warmup 0 --grouped-mm"
        .split(' ')
        .map(String::from)
        .collect();
    // The test command sets MOTLEY_PYTHON to the venv whose torch matches libtorch.
    let python = std::env::var("MOTLEY_PYTHON").ok();
    match &python {
        Some(py) => args.extend(["--python".into(), py.clone(), "--script".into(), script.display().to_string()]),
        None => args.push("--no-torch".into()),
    }
    let out = Command::new(env!("CARGO_BIN_EXE_motley")).args(&args).env("RUST_LOG", "warn").output()?;
    anyhow::ensure!(out.status.success(), "motley {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout)?;

    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    for k in ["dense_step_ms", "mot_step_ms", "dense_fwd_bwd_ms", "mot_fwd_bwd_ms", "mot_grouped_step_ms"] {
        assert!(f(k) > 0.0, "{k} in {r}");
    }
    assert!((f("mot_over_dense") - f("mot_step_ms") / f("dense_step_ms")).abs() < 1e-9, "{r}");

    // MoT runs every projection once per tower: more operators than dense, and more
    // work-doing ones. (Grouped GEMMs are one op each on sm_90 CUDA; on CPU torch loops over
    // the groups, so no order is asserted for them here.)
    for per in ["ops_per_step", "kernels_per_step"] {
        let ops = &r[per];
        let (dense, mot, grouped) = (ops["dense"].as_u64(), ops["mot"].as_u64(), ops["mot_grouped"].as_u64());
        let (Some(dense), Some(mot), Some(grouped)) = (dense, mot, grouped) else { anyhow::bail!("{per}: {r}") };
        assert!(dense > 100 && mot > dense && grouped > 0, "{per}: {ops}");
    }
    let ratio =
        r["kernels_per_step"]["mot"].as_f64().unwrap_or(0.0) / r["kernels_per_step"]["dense"].as_f64().unwrap_or(1.0);
    assert!((f("mot_over_dense_kernels") - ratio).abs() < 1e-9);
    assert!(r["ops_per_step"]["mot"].as_u64() > r["kernels_per_step"]["mot"].as_u64(), "views and composites: {r}");
    let extra = r["mot_extra_kernels"].as_array().cloned().unwrap_or_default();
    assert!(!extra.is_empty() && extra.len() <= 10, "{r}");
    // 2 layers x 4 projections (q|k|v, o, gate|up, down) x 2 more towers x (forward + 2 backward).
    let mm = extra.iter().find(|e| e[0] == "aten::mm").and_then(|e| e[1].as_i64());
    assert_eq!(mm, Some(2 * 4 * 2 * 3), "per-tower matmuls: {r}");

    match python {
        Some(_) => assert!(f("tch_over_torch") > 0.0 && f("torch_fwd_bwd_ms") > 0.0, "PyTorch reference ran: {r}"),
        None => assert_eq!(r["torch_note"], "skipped (--no-torch)"),
    }
    Ok(())
}

/// `motley bench ingest --webdataset` on one copy of the sample digits: both readers see every
/// sample, and image ingest from the tars and from the files gives the same document count.
#[test]
fn bench_ingest_webdataset_reads_every_sample_on_both_sides() -> anyhow::Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var("MOTLEY_PYTHON").unwrap_or_else(|_| "python3".into());
    let args = ["--json", "bench", "ingest", "--webdataset", "--copies", "1", "--files", "3", "--repeat", "1"];
    let out = Command::new(env!("CARGO_BIN_EXE_motley"))
        .args(args)
        .args(["--python", &python, "--workers", "2"])
        .current_dir(&repo)
        .output()?;
    anyhow::ensure!(out.status.success(), "motley {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout)?;
    let n = r["samples"].as_u64();
    assert_eq!(n, Some(1797), "{r}");
    assert_eq!(r["tars"], 3);
    for side in ["motley_reader_alone", "python_tarfile_alone", "ingest_from_tars", "ingest_from_files"] {
        assert_eq!(r[side]["samples"].as_u64(), n, "{side}: {r}");
        assert!(r[side]["samples_per_s"].as_f64().is_some_and(|v| v > 0.0), "{side}: {r}");
    }
    for ratio in ["read_ratio", "ingest_ratio"] {
        assert!(r[ratio].as_f64().is_some_and(|v| v > 0.0), "{ratio}: {r}");
    }
    Ok(())
}

/// `motley --json bench checkpoint --preset tiny --repeat 1 EXTRA…` in a temporary folder.
fn bench_checkpoint(extra: &[&str]) -> anyhow::Result<Value> {
    let tmp = tempfile::tempdir()?;
    let args = [&["--json", "bench", "checkpoint", "--preset", "tiny", "--repeat", "1"], extra].concat();
    let out = Command::new(env!("CARGO_BIN_EXE_motley"))
        .args(&args)
        .arg("--dir")
        .arg(tmp.path())
        .env("OMP_NUM_THREADS", "1")
        .output()?;
    anyhow::ensure!(out.status.success(), "motley {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `motley bench checkpoint` on the tiny preset: both modes train the same steps, write the
/// same checkpoints, and report their stall and the ratios.
#[test]
fn bench_checkpoint_times_both_modes() -> anyhow::Result<()> {
    let r = bench_checkpoint(&["--steps", "4", "--every", "2"])?;
    let rows = r["rows"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.iter().map(|x| x["mode"].clone()).collect::<Vec<_>>(), ["sync", "async"], "{r}");
    for row in &rows {
        assert_eq!((row["steps"].as_u64(), row["checkpoints"].as_u64()), (Some(4), Some(2)), "{r}");
        // The same tensors; meta.json says `"checkpoint_async": true` or `false`.
        let (a, b) = (row["checkpoint_bytes"].as_u64().unwrap_or(0), rows[0]["checkpoint_bytes"].as_u64().unwrap_or(1));
        assert!(a > 0 && a.abs_diff(b) <= 1, "{r}");
        assert!(row["checkpoint_s"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    }
    for ratio in ["stall_ratio", "wall_ratio"] {
        assert!(r[ratio].as_f64().is_some_and(|v| v > 0.0), "{ratio}: {r}");
    }
    Ok(())
}

/// `motley bench checkpoint --nproc 2`: two ranks under ZeRO-3 write the same checkpoints in
/// both formats, rank 0 gathering (full) or every rank its own chunk (per_rank).
#[test]
fn bench_checkpoint_compares_the_formats_on_two_ranks() -> anyhow::Result<()> {
    let r = bench_checkpoint(&["--nproc", "2", "--steps", "2", "--every", "2"])?;
    let rows = r["rows"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.iter().map(|x| x["mode"].clone()).collect::<Vec<_>>(), ["full", "per_rank"], "{r}");
    assert_eq!(r["nproc"].as_u64(), Some(2), "{r}");
    for row in &rows {
        assert_eq!((row["steps"].as_u64(), row["checkpoints"].as_u64()), (Some(2), Some(1)), "{r}");
        assert!(row["checkpoint_s"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    }
    // The same tensors: per_rank adds only its index and the pieces' names.
    let bytes = |i: usize| rows[i]["checkpoint_bytes"].as_f64().unwrap_or(0.0);
    assert!(bytes(0) > 0.0 && (bytes(1) / bytes(0) - 1.0).abs() < 0.05, "{r}");
    assert!(r["stall_ratio"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    Ok(())
}
