//! `motley plan`: the paper's 7B MoT on 64 × 80 GB needs the settings the plan names, and fits
//! with them; the preset table covers every preset and architecture.

use std::process::Command;

use serde_json::Value;

fn plan(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_motley")).arg("--json").arg("plan").args(args).output().expect("spawn");
    assert!(out.status.success(), "motley plan {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("plan JSON")
}

#[test]
fn the_7b_mot_on_64_gpus_of_80gb_fits_with_the_settings_the_plan_names() {
    let base = ["--preset", "7b", "--arch", "mot", "--gpus", "64", "--gpu-mem", "80GB"];
    let p = plan(&base);
    assert_eq!(p["fits"], false, "{p}");
    let named = p["suggestions"][0].as_str().expect("a suggestion").to_string();
    assert!(named.contains("train.zero=3"), "{named}");
    let mut args: Vec<&str> = base.to_vec();
    for kv in named.split_whitespace() {
        args.extend(["--set", kv]);
    }
    let q = plan(&args);
    assert_eq!(q["fits"], true, "{q}");
    let b = &q["bytes"];
    let num = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
    // ZeRO-3 over 64 ranks: 1/64 of 16 bytes per parameter, plus what a step gathers.
    let params = q["params"].as_f64().expect("params");
    assert!((num("weights") - 4.0 * params / 64.0).abs() < 1.0, "{b}");
    assert!((num("moments") - 8.0 * params / 64.0).abs() < 1.0, "{b}");
    assert!(num("activations") < num("activations_full") / 4.0, "{b}");
    assert!(num("total") <= 80e9, "{b}");
}

#[test]
fn the_table_names_gpus_and_settings_for_every_preset_and_architecture() {
    let rows = plan(&["--table"]);
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 2 * 9, "9 presets × dense, MoT");
    let mot7 = rows.iter().find(|r| r["preset"] == "7b" && r["arch"] == "mot").expect("7b mot");
    assert!(mot7["gpus_80gb"].as_u64().is_some_and(|g| g > 1), "{mot7}");
    let small = rows.iter().find(|r| r["preset"] == "37m" && r["arch"] == "mot").expect("37m mot");
    assert_eq!(small["gpus_80gb"], 1, "{small}");
}

#[test]
fn a_bad_memory_size_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_motley")).args(["plan", "--gpu-mem", "lots"]).output().expect("spawn");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gpu-mem"), "{}", String::from_utf8_lossy(&out.stderr));
}
