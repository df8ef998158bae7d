//! `motley study` from the command line on the built-in synthetic documents: the table, and
//! the `--json` report's schema (keys and value types; numbers depend on the build's rounding)
//! as an insta snapshot.

use std::process::Command;

use serde_json::{Map, Value};

/// The shape of a JSON value: every scalar replaced by its type name, arrays by the merged
/// shape of their elements (keys of all objects; a value's type where others are null, so
/// only a field that is null in every element shows as "null").
fn shape(v: &Value) -> Value {
    match v {
        Value::Null => Value::String("null".into()),
        Value::Bool(_) => Value::String("bool".into()),
        Value::Number(_) => Value::String("number".into()),
        Value::String(_) => Value::String("string".into()),
        Value::Array(items) => Value::Array(items.iter().map(shape).reduce(|a, b| merge(&a, &b)).into_iter().collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

fn merge(a: &Value, b: &Value) -> Value {
    match (a, b) {
        // Null where another element has a value (a match not reached, a curve without
        // images): the value's shape, so the snapshot does not depend on which runs reached.
        (Value::String(n), x) | (x, Value::String(n)) if n == "null" => x.clone(),
        (Value::Object(x), Value::Object(y)) => {
            let mut out = Map::new();
            for k in x.keys().chain(y.keys()) {
                let v = match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => merge(p, q),
                    (Some(p), None) | (None, Some(p)) => p.clone(),
                    (None, None) => continue,
                };
                out.insert(k.clone(), v);
            }
            Value::Object(out)
        }
        (Value::Array(x), Value::Array(y)) => {
            Value::Array(x.iter().chain(y).cloned().reduce(|p, q| merge(&p, &q)).into_iter().collect())
        }
        (x, _) => x.clone(),
    }
}

#[test]
fn study_json_schema_and_table() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("study");
    let out_s = out.to_str().unwrap_or_default();
    let mut args: Vec<&str> =
        "--json study --set data.synthetic=true --steps 8 --eval-every 4 --seeds 2 --moe --device cpu --out"
            .split_whitespace()
            .collect();
    args.push(out_s);
    // A model small enough for seconds per run in a debug build.
    for s in [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.ffn_multiple_of=16",
        "data.seq_len=64",
        "data.batch_size=4",
        "optim.warmup_steps=2",
        "train.eval_batches=1",
        "train.threads=1",
    ] {
        args.extend(["--set", s]);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_motley")).args(&args).env("OMP_NUM_THREADS", "1").output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    anyhow::ensure!(o.status.success(), "motley study failed: {}\n{stderr}", o.status);
    // Progress on stderr, the report on stdout.
    assert!(stderr.contains("study: run 6/6: moe, seed 1"), "{stderr}");
    let v: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["schema"], "motley.study/1");
    assert_eq!(v["runs"].as_array().map(Vec::len), Some(6));
    assert_eq!(v["seeds"], serde_json::json!([0, 1]));
    // Every run evaluated at 0, 4 and 8.
    for r in v["runs"].as_array().into_iter().flatten() {
        let steps: Vec<u64> = r["curve"].as_array().into_iter().flatten().filter_map(|p| p["step"].as_u64()).collect();
        assert_eq!(steps, [0, 4, 8]);
    }
    assert!(out.join("study.json").exists() && out.join("study.png").exists());
    insta::assert_json_snapshot!("study_schema", shape(&v));
    // Without --json: the table on stdout; rerunning into the same directory needs --overwrite.
    let plain: Vec<&str> = args.iter().skip(1).copied().collect();
    let o = Command::new(env!("CARGO_BIN_EXE_motley")).args(&plain).env("OMP_NUM_THREADS", "1").output()?;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    let mut again = plain.clone();
    again.push("--overwrite");
    let o = Command::new(env!("CARGO_BIN_EXE_motley")).args(&again).env("OMP_NUM_THREADS", "1").output()?;
    anyhow::ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.starts_with("step matching"), "{table}");
    for needle in ["image      mot", "speech     moe", "0.260 (37M)"] {
        assert!(table.contains(needle), "missing {needle:?}:\n{table}");
    }
    // --report-only prints the same table from study.json without training.
    std::fs::remove_file(out.join("study.png"))?;
    let o = Command::new(env!("CARGO_BIN_EXE_motley")).args(["study", "--report-only", "--out", out_s]).output()?;
    anyhow::ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), table);
    assert!(out.join("study.png").exists());
    Ok(())
}
