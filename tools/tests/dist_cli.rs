//! Data-parallel training through the `motley` binary, several processes on 127.0.0.1 over
//! torch's c10d (Gloo): N ranks × batch b train what one process with batch N·b trains, ZeRO-1
//! shards the moments without changing the curve, a run resumes on another number of ranks
//! consuming every row exactly once, a killed rank ends the job with its name, ranks that
//! disagree on the config fail at start, the torchrun and Slurm launches work as the README
//! shows them, and SIGTERM makes every rank checkpoint the same step and exit 143.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const LAUNCH_VARS: [&str; 8] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
];

/// `motley` with no launch variables inherited and one thread per process.
fn motley() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_motley"));
    for v in LAUNCH_VARS {
        c.env_remove(v);
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("SLURM_") {
            c.env_remove(k);
        }
    }
    c.env("OMP_NUM_THREADS", "1").env("RUST_LOG", "warn");
    c
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A tiny model and loop: 10 steps, evaluation at 5 and 10, checkpoints at 5 and 10.
fn tiny(corpus: &Path, out: &Path, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = vec!["--json".into(), "train".into(), "--preset".into(), "tiny".into()];
    a.extend(["--data".into(), corpus.display().to_string(), "--out".into(), out.display().to_string()]);
    for s in [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.ffn_multiple_of=16",
        "data.seq_len=64",
        "data.eval_fraction=0.1",
        "optim.warmup_steps=2",
        "train.steps=10",
        "train.log_every=1",
        "train.eval_every=5",
        "train.eval_batches=1",
        "train.checkpoint_every=5",
        "train.device=\"cpu\"",
        "train.threads=1",
        "train.dist_timeout_s=30",
    ] {
        a.extend(["--set".into(), s.into()]);
    }
    a.extend(extra.iter().cloned());
    a
}

fn set(kv: &str) -> Vec<String> {
    vec!["--set".into(), kv.into()]
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn train(args: &[String]) -> Value {
    let out = ok(motley().args(args).output().expect("spawn motley"), &format!("motley {}", args.join(" ")));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "summary JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line"))
        .collect()
}

/// Per step: the loss and the per-modality train losses, then the held-out ones if any.
fn curve(run: &Path) -> Vec<Vec<f64>> {
    metrics(run)
        .iter()
        .map(|r| {
            let mut v: Vec<f64> = ["loss", "loss_text", "loss_image", "loss_speech", "loss_diffusion"]
                .iter()
                .filter_map(|k| r[*k].as_f64())
                .collect();
            if let Some(e) = r["eval"].as_object() {
                v.extend(["text", "image", "speech", "diffusion"].iter().filter_map(|k| e.get(*k)?.as_f64()));
            }
            v
        })
        .collect()
}

fn assert_curves_close(a: &[Vec<f64>], b: &[Vec<f64>], rtol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: steps");
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.len(), y.len(), "{what}: step {} has other values: {x:?} vs {y:?}", step + 1);
        for (u, v) in x.iter().zip(y) {
            assert!((u - v).abs() <= rtol * v.abs().max(1e-3), "{what}: step {}: {x:?} vs {y:?}", step + 1);
        }
    }
}

fn corpus(dir: &Path, latent: bool) -> PathBuf {
    let p = dir.join(if latent { "latent-corpus" } else { "corpus" });
    if latent {
        motley_trainer::loader::write_synthetic_corpus_latent(&p, 300, 5, 6).expect("latent corpus");
    } else {
        motley_trainer::loader::write_synthetic_corpus(&p, 300, 5).expect("corpus");
    }
    p
}

#[test]
fn two_ranks_train_what_one_process_with_twice_the_batch_trains() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, latent, arch) in [("dense", false, "dense"), ("mot", false, "mot"), ("transfusion", true, "mot")] {
        let data = corpus(dir.path(), latent);
        let one = dir.path().join(format!("{name}-1"));
        let two = dir.path().join(format!("{name}-2"));
        let arch = format!("model.arch=\"{arch}\"");
        train(&tiny(&data, &one, &[set(&arch), set("data.batch_size=4")].concat()));
        let s = train(&tiny(
            &data,
            &two,
            &[args(&["--nproc", "2"]), set(&arch), set("data.batch_size=2"), set("train.verify_replicas=true")]
                .concat(),
        ));
        assert_eq!(s["world"], 2, "{s}");
        // The replicas' weights were compared through the store at the end: bitwise equal.
        assert!(s["weights_blake3"].as_str().is_some_and(|h| h.len() == 64), "{s}");
        let (a, b) = (curve(&one), curve(&two));
        assert_eq!(a.len(), 10);
        if latent {
            assert!(metrics(&two)[0]["loss_diffusion"].as_f64().is_some(), "Transfusion loss present");
        }
        assert_curves_close(&a, &b, 1e-5, name);
        // Communication overlapped backward: buckets started inside it on a step.
        assert!(metrics(&two).iter().any(|r| r["buckets_overlapped"].as_u64().is_some()), "{name}");
    }
}

#[test]
fn one_rank_through_the_process_group_is_the_single_process_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    let (plain, group) = (dir.path().join("plain"), dir.path().join("group"));
    let extra = [set("data.batch_size=2"), set("train.steps=4")].concat();
    train(&tiny(&data, &plain, &extra));
    // What `torchrun --nproc-per-node 1` sets: a world of one that still rendezvouses.
    let out = motley()
        .args(tiny(&data, &group, &extra))
        .envs(torchrun_vars(1, free_port())(0))
        .output()
        .expect("spawn motley");
    let s: Value = serde_json::from_slice(&ok(out, "one rank under a launcher").stdout).expect("summary");
    assert_eq!(s["world"], 1);
    assert!(metrics(&group)[0]["comm_s"].is_number(), "the data-parallel path ran");
    assert_eq!(curve(&plain), curve(&group));
}

#[test]
fn zero_one_shards_the_moments_and_keeps_the_curve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    let (plain, zero) = (dir.path().join("plain"), dir.path().join("zero"));
    let common = [args(&["--nproc", "2"]), set("data.batch_size=2"), set("train.bucket_mb=0.01")].concat();
    let a = train(&tiny(&data, &plain, &common));
    let b =
        train(&tiny(&data, &zero, &[common.clone(), set("train.zero=1"), set("train.verify_replicas=true")].concat()));
    assert_curves_close(&curve(&plain), &curve(&zero), 1e-5, "ZeRO-1 vs plain");
    let m = |s: &Value| s["state_bytes"]["moments"].as_f64().unwrap_or(f64::NAN);
    let ratio = m(&b) / m(&a);
    assert!((0.45..=0.55).contains(&ratio), "rank 0 holds about half the moments: {ratio} ({a} / {b})");
    assert_eq!(a["state_bytes"]["weights"], b["state_bytes"]["weights"]);
    assert!(b["weights_blake3"].is_string(), "replicas equal after all-gathers: {b}");
    // The checkpoint holds whole moments under the public names, whatever the sharding.
    let ckpt = zero.join("checkpoints/step-00000010");
    let opt = motley_trainer::checkpoint::read_tensors(&ckpt.join("optimizer.safetensors")).expect("optimizer");
    let plain_opt =
        motley_trainer::checkpoint::read_tensors(&plain.join("checkpoints/step-00000010/optimizer.safetensors"))
            .expect("optimizer");
    assert_eq!(opt.keys().collect::<Vec<_>>(), plain_opt.keys().collect::<Vec<_>>());
    for (k, t) in &opt {
        assert_eq!(t.size(), plain_opt[k].size(), "{k}");
    }
}

#[test]
fn zero_three_shards_the_weights_gathers_a_block_at_a_time_and_keeps_the_curve() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, latent) in [("mot", false), ("transfusion", true)] {
        let data = corpus(dir.path(), latent);
        let run = |tag: &str, extra: &[String]| {
            let out = dir.path().join(format!("{name}-{tag}"));
            let common = [set("model.n_layers=3"), set("train.activation_checkpointing=true")].concat();
            (train(&tiny(&data, &out, &[common, extra.to_vec()].concat())), out)
        };
        let (_, one) = run("one", &set("data.batch_size=4"));
        let (_, dp) = run("dp", &[args(&["--nproc", "2"]), set("data.batch_size=2")].concat());
        let (s, z3) = run(
            "zero3",
            &[
                args(&["--nproc", "2"]),
                set("data.batch_size=2"),
                set("train.zero=3"),
                set("train.verify_replicas=true"),
            ]
            .concat(),
        );
        assert_curves_close(&curve(&dp), &curve(&z3), 1e-5, &format!("{name}: ZeRO-3 vs plain data parallel"));
        assert_curves_close(&curve(&one), &curve(&z3), 1e-5, &format!("{name}: ZeRO-3 vs one process"));
        assert!(s["weights_blake3"].is_string(), "replicas gather to equal weights: {s}");
        // Rank 0 keeps half of every weight, gradient and moment; gathered, at most unit 0 (the
        // embedding and head) and two blocks (the one running and the one prefetched).
        let z = &s["zero3"];
        let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let whole = 4.0 * num(&s["params"]);
        let shard = num(&z["shard"]);
        assert!((shard / whole - 0.5).abs() < 0.02, "rank 0 holds {shard} of {whole} bytes of weights: {s}");
        assert_eq!(num(&s["state_bytes"]["moments"]), 2.0 * shard, "{s}");
        let (peak, root, block) = (num(&z["peak_gathered"]), num(&z["root_unit"]), num(&z["largest_unit"]));
        assert!(
            peak >= root + block && peak <= root + 2.0 * block,
            "gathered at most: {peak} (root {root}, block {block})"
        );
        assert!(peak < whole, "never the whole model in a step: {peak} of {whole}");
        // The memory plan predicted what rank 0 holds (padding aside) and, in one process
        // (where no collective's buffers are freed late by Gloo's threads), what a step adds.
        let plan = &s["planned_bytes"];
        for k in ["weights", "gradients", "moments"] {
            let (want, got) = (num(&plan[k]), num(&s["state_bytes"][k]));
            assert!((want - got).abs() / got < 0.02, "{k}: planned {want}, held {got}");
        }
        let (solo, _) = run("zero3-one", &[set("data.batch_size=4"), set("train.zero=3")].concat());
        let (want, got) = (num(&solo["planned_bytes"]["step"]), num(&solo["step_peak_bytes"]));
        assert!((want - got).abs() / got <= 0.15, "{name}: a step planned {want} bytes, measured {got}");
        // Its checkpoint is the plain run's, tensor for tensor (names, shapes; values close).
        let step = "checkpoints/step-00000010";
        let (a, b) = (dp.join(step), z3.join(step));
        for file in ["model.safetensors", "optimizer.safetensors"] {
            let x = motley_trainer::checkpoint::read_tensors(&a.join(file)).expect("plain checkpoint");
            let y = motley_trainer::checkpoint::read_tensors(&b.join(file)).expect("ZeRO-3 checkpoint");
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{file}");
            for (k, t) in &x {
                let diff = f64::try_from((t - &y[k]).abs().max()).expect("max");
                assert!(diff < 1e-4, "{name} {file} {k}: differs by {diff}");
            }
        }
    }
}

/// Three checkpointed blocks, 12 rows a step, a checkpoint and an evaluation every 3 steps.
fn three_blocks_every_third_step(steps: u64) -> Vec<String> {
    [
        set("model.n_layers=3"),
        set("train.activation_checkpointing=true"),
        set("data.batch_size=2"),
        set("optim.global_batch=12"),
        set(&format!("train.steps={steps}")),
        set("train.checkpoint_every=3"),
        set("train.eval_every=3"),
    ]
    .concat()
}

#[test]
fn checkpoints_move_between_zero_three_and_plain_on_other_world_sizes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    let base = three_blocks_every_third_step;
    let whole = dir.path().join("whole");
    train(&tiny(&data, &whole, &[args(&["--nproc", "2"]), base(9)].concat()));
    // Plain on 2 ranks → ZeRO-3 on 3 ranks → ZeRO-3 in one process → plain on 2 ranks.
    let run = dir.path().join("resumed");
    train(&tiny(&data, &run, &[args(&["--nproc", "2"]), base(9), set("train.stop_at=3")].concat()));
    let resume = |extra: &[String]| resume(&run, extra);
    let s = resume(&[args(&["--nproc", "3"]), set("train.stop_at=5"), set("train.zero=3")].concat());
    assert_eq!((s["world"].as_u64(), s["steps"].as_u64()), (Some(3), Some(5)), "{s}");
    assert!(s["zero3"].is_object(), "{s}");
    let s = resume(&[set("train.stop_at=6"), set("train.zero=3")].concat());
    assert_eq!((s["world"].as_u64(), s["steps"].as_u64()), (Some(1), Some(6)), "{s}");
    let s = resume(&[args(&["--nproc", "2"]), set("train.stop_at=0"), set("train.zero=0")].concat());
    assert_eq!((s["world"].as_u64(), s["steps"].as_u64(), s["zero3"].is_null()), (Some(2), Some(9), true), "{s}");
    assert_curves_close(&curve(&whole), &curve(&run), 1e-5, "plain → ZeRO-3 (3 ranks, 1 rank) → plain");
}

#[test]
fn per_rank_checkpoints_are_written_by_every_rank_and_resume_on_other_world_sizes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    let base = three_blocks_every_third_step;
    let whole = dir.path().join("whole");
    train(&tiny(&data, &whole, &[args(&["--nproc", "2"]), base(9), set("train.zero=3")].concat()));
    // ZeRO-3 on 2 ranks, each writing its own files → 3 ranks (in the background) → one process.
    let run = dir.path().join("per-rank");
    let per_rank = set("train.checkpoint_format=\"per_rank\"");
    let first = [args(&["--nproc", "2"]), base(9), set("train.zero=3"), per_rank.clone(), set("train.stop_at=3")];
    train(&tiny(&data, &run, &first.concat()));
    let ckpt = run.join("checkpoints/step-00000003");
    for f in ["ranks.json", "model-rank-00000-of-00002.safetensors", "optimizer-rank-00001-of-00002.safetensors"] {
        assert!(ckpt.join(f).exists(), "{f} in {}", ckpt.display());
    }
    assert!(!ckpt.join("model.safetensors").exists());
    let s =
        resume(&run, &[args(&["--nproc", "3"]), set("train.stop_at=6"), set("train.checkpoint_async=true")].concat());
    assert_eq!((s["world"].as_u64(), s["steps"].as_u64()), (Some(3), Some(6)), "{s}");
    let six = run.join("checkpoints/step-00000006");
    assert!(six.join("meta.json").exists() && six.join("model-rank-00002-of-00003.safetensors").exists());
    let s = resume(&run, &[set("train.stop_at=0"), set("train.zero=0")].concat());
    assert_eq!((s["world"].as_u64(), s["steps"].as_u64()), (Some(1), Some(9)), "{s}");
    assert_curves_close(&curve(&whole), &curve(&run), 1e-5, "per-rank checkpoints: 2 → 3 → 1 ranks");
    // The weights read back whole (as eval, sample and export read them) are the full format's.
    let end = "checkpoints/step-00000009";
    let x = motley_trainer::checkpoint::read_model(&whole.join(end)).expect("full checkpoint");
    let y = motley_trainer::checkpoint::read_model(&run.join(end)).expect("per-rank checkpoint");
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    for (k, t) in &x {
        let diff = f64::try_from((t - &y[k]).abs().max()).expect("max");
        assert!(diff < 1e-4, "{k}: differs by {diff}");
    }
    // `motley export --whole` consolidates the 3-rank checkpoint into the full format.
    let whole6 = dir.path().join("whole-6");
    let mut c = motley();
    c.args(["--json", "export", "--whole", "--checkpoint"]).arg(&six).arg("--out").arg(&whole6);
    let out = ok(c.output().expect("spawn motley"), "motley export --whole");
    let v: Value = serde_json::from_slice(&out.stdout).expect("export json");
    assert_eq!((v["step"].as_u64(), v["source_world"].as_u64()), (Some(6), Some(3)), "{v}");
    let opt = motley_trainer::checkpoint::read_tensors(&whole6.join("optimizer.safetensors")).expect("moments");
    let ranked = motley_trainer::per_rank::Stored::open(&six, true).expect("per-rank checkpoint");
    assert_eq!(opt.len(), ranked.names().filter(|n| motley_trainer::per_rank::is_moment(n)).count());
    for (k, t) in &opt {
        assert!(t.equal(&ranked.read(k).expect("read")), "{k}");
    }
    // A rank's file missing (written to another node's disk) is named at once.
    std::fs::remove_file(six.join("model-rank-00001-of-00003.safetensors")).expect("remove");
    let e = motley_trainer::checkpoint::read_model(&six).expect_err("missing rank file").to_string();
    assert!(e.contains("model-rank-00001-of-00003.safetensors") && e.contains("every node"), "{e}");
}

/// `motley --json train --resume RUN EXTRA…`: the summary.
fn resume(run: &Path, extra: &[String]) -> Value {
    let mut a: Vec<String> = vec!["--json".into(), "train".into(), "--resume".into(), run.display().to_string()];
    a.extend(extra.iter().cloned());
    train(&a)
}

/// Global row ids each rank trained on, over a run's row logs, up to `last_step`.
fn rows(run: &Path, last_step: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(run.join("rows")).expect("rows folder") {
        let text = std::fs::read_to_string(e.expect("entry").path()).expect("row log");
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).expect("row line");
            if v["step"].as_u64().is_some_and(|s| s <= last_step) {
                out.extend(v["rows"].as_array().expect("rows").iter().filter_map(Value::as_u64));
            }
        }
    }
    out.sort_unstable();
    out
}

#[test]
fn a_run_resumes_on_three_ranks_with_zero_then_one_continuing_the_curve_and_using_every_row_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    // 12 rows per step: 2 ranks × 2 × 3 accumulation, 3 × 2 × 2, 1 × 2 × 6.
    let base = |steps| {
        [
            set("data.batch_size=2"),
            set("optim.global_batch=12"),
            set(&format!("train.steps={steps}")),
            set("train.checkpoint_every=3"),
            set("train.eval_every=3"),
            set("train.log_rows=true"),
        ]
        .concat()
    };
    let whole = dir.path().join("whole");
    train(&tiny(&data, &whole, &[args(&["--nproc", "2"]), base(9)].concat()));
    let run = dir.path().join("resumed");
    train(&tiny(&data, &run, &[args(&["--nproc", "2"]), base(9), set("train.stop_at=3")].concat()));
    let resume = |extra: &[String]| resume(&run, extra);
    // The middle segment shards the optimizer state (ZeRO-1): checkpoints move between both.
    let s = resume(&[args(&["--nproc", "3"]), set("train.stop_at=6"), set("train.zero=1")].concat());
    assert_eq!((s["world"].as_u64(), s["steps"].as_u64()), (Some(3), Some(6)), "{s}");
    let s = resume(&set("train.stop_at=0"));
    assert_eq!((s["world"].as_u64(), s["steps"].as_u64()), (Some(1), Some(9)), "{s}");
    assert_curves_close(&curve(&whole), &curve(&run), 1e-5, "2 → 3 → 1 ranks vs 2 throughout");
    let (seen, want) = (rows(&run, 9), rows(&whole, 9));
    assert_eq!(seen.len(), 9 * 12, "every step trained 12 rows");
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), seen.len(), "no row twice");
    assert_eq!(seen, want, "the same rows as the uninterrupted run: none skipped");
}

/// A free TCP port on 127.0.0.1 (closed again; the rendezvous binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Starts the ranks of a job by hand, as a cluster's launcher does: `vars(rank)` are each
/// rank's launch variables, `args(rank)` its command line.
fn spawn_ranks(
    world: usize,
    vars: impl Fn(usize) -> Vec<(String, String)>,
    args: impl Fn(usize) -> Vec<String>,
) -> Vec<Child> {
    (0..world)
        .map(|r| {
            motley()
                .args(args(r))
                .envs(vars(r))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn rank")
        })
        .collect()
}

fn torchrun_vars(world: usize, port: u16) -> impl Fn(usize) -> Vec<(String, String)> {
    move |r| {
        [
            ("RANK", r.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("LOCAL_RANK", r.to_string()),
            ("LOCAL_WORLD_SIZE", world.to_string()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Waits for a child up to `limit`; kills it and fails the test past that.
fn wait_within(mut c: Child, limit: Duration, what: &str) -> Output {
    let started = Instant::now();
    loop {
        if c.try_wait().expect("wait").is_some() {
            return c.wait_with_output().expect("output");
        }
        if started.elapsed() > limit {
            let _ = c.kill();
            let out = c.wait_with_output().expect("output");
            panic!("{what} still running after {limit:?}: the job hangs\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_rank_ends_the_job_naming_it_and_the_last_checkpoint_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    let run = dir.path().join("run");
    let args = |_r: usize| {
        tiny(
            &data,
            &run,
            &[
                set("data.batch_size=2"),
                set("train.steps=100000"),
                set("train.checkpoint_every=2"),
                set("train.eval_every=0"),
                set("train.dist_timeout_s=10"),
            ]
            .concat(),
        )
    };
    let mut ranks = spawn_ranks(2, torchrun_vars(2, free_port()), args);
    // Let it train past a checkpoint, then kill rank 1 outright.
    let started = Instant::now();
    while motley_trainer::checkpoint::list(&run).map(|l| l.len()).unwrap_or(0) < 2 {
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint after 2 minutes");
        std::thread::sleep(Duration::from_millis(100));
    }
    ranks[1].kill().expect("SIGKILL rank 1");
    let _ = ranks[1].wait();
    let rank0 = wait_within(ranks.remove(0), Duration::from_secs(90), "rank 0 after rank 1 was killed");
    let err = String::from_utf8_lossy(&rank0.stderr);
    assert!(!rank0.status.success(), "rank 0 must fail: {err}");
    assert!(err.contains("rank 1"), "the message names the lost rank: {err}");
    // The last complete checkpoint resumes (one process now).
    let last = motley_trainer::checkpoint::list(&run).expect("checkpoints").pop().expect("a checkpoint").0;
    let s = train(&[
        "--json".into(),
        "train".into(),
        "--resume".into(),
        run.display().to_string(),
        "--steps".into(),
        (last + 2).to_string(),
    ]);
    assert_eq!(s["steps"].as_u64(), Some(last + 2), "{s}");
}

#[test]
fn ranks_that_disagree_on_the_config_fail_at_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    let run = dir.path().join("run");
    let args = |r: usize| tiny(&data, &run, &[set("data.batch_size=2"), set(&format!("train.seed={r}"))].concat());
    let ranks = spawn_ranks(2, torchrun_vars(2, free_port()), args);
    for (r, c) in ranks.into_iter().enumerate() {
        let out = wait_within(c, Duration::from_secs(90), "a rank with a mismatched config");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "rank {r} must fail: {err}");
        assert!(err.contains("train.seed") && err.contains("rank 1"), "rank {r}: {err}");
    }
    assert!(!run.join("checkpoints").exists(), "nothing trained");
}

#[test]
fn a_rank_that_never_joins_or_a_bad_launch_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    let run = dir.path().join("run");
    let args = tiny(&data, &run, &[set("data.batch_size=2"), set("train.dist_timeout_s=3")].concat());
    // Rank 0 of 2 alone: the rendezvous times out naming how many joined.
    let out = motley().args(&args).envs(torchrun_vars(2, free_port())(0)).output().expect("spawn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("1/2 clients joined") && err.contains("rendezvous"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Conflicting variables: LOCAL_RANK past LOCAL_WORLD_SIZE.
    let mut vars = torchrun_vars(2, free_port())(1);
    vars.push(("LOCAL_WORLD_SIZE".into(), "1".into()));
    let out = motley().args(&args).envs(vars).output().expect("spawn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("LOCAL_RANK=1 is not below LOCAL_WORLD_SIZE=1"), "{err}");
}

#[test]
fn slurm_variables_launch_a_job_as_in_the_readme() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    let run = dir.path().join("run");
    let port = free_port();
    // What `srun --ntasks 2 --ntasks-per-node 2 motley train …` sets in each task (the README's
    // example exports MASTER_PORT; without it the port comes from SLURM_JOB_ID).
    let vars = move |r: usize| -> Vec<(String, String)> {
        [
            ("SLURM_JOB_ID", "4242".to_string()),
            ("SLURM_STEP_ID", "0".into()),
            ("SLURM_PROCID", r.to_string()),
            ("SLURM_LOCALID", r.to_string()),
            ("SLURM_NODEID", "0".into()),
            ("SLURM_NTASKS", "2".into()),
            ("SLURM_STEP_NUM_TASKS", "2".into()),
            ("SLURM_STEP_TASKS_PER_NODE", "2".into()),
            ("SLURM_STEP_NODELIST", "localhost".into()),
            ("MASTER_PORT", port.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    let args = |_r: usize| tiny(&data, &run, &[set("data.batch_size=2"), set("train.steps=3")].concat());
    let ranks = spawn_ranks(2, vars, args);
    let outs: Vec<Output> =
        ranks.into_iter().map(|c| wait_within(c, Duration::from_secs(120), "a Slurm task")).collect();
    let outs: Vec<Output> = outs.into_iter().map(|o| ok(o, "Slurm task")).collect();
    let s: Value = serde_json::from_slice(&outs[0].stdout).expect("rank 0 prints the summary");
    assert_eq!((s["world"].as_u64(), s["steps"].as_u64()), (Some(2), Some(3)), "{s}");
    assert!(outs[1].stdout.is_empty(), "only rank 0 prints results");
}

#[test]
fn torchrun_starts_the_ranks_as_in_the_readme() {
    // scripts/setup gives the venv a `torchrun` (torch.distributed.run of the installed torch);
    // the test command points MOTLEY_PYTHON at that venv's python.
    let Some(python) = std::env::var_os("MOTLEY_PYTHON") else {
        panic!("MOTLEY_PYTHON is not set: run the tests through scripts/test (it sets up the venv with torchrun)");
    };
    let torchrun = Path::new(&python).with_file_name("torchrun");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    let run = dir.path().join("run");
    let mut cmd = Command::new(&torchrun);
    for v in LAUNCH_VARS {
        cmd.env_remove(v);
    }
    let port = free_port();
    cmd.args(["--no-python", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d"])
        .arg(format!("--rdzv-endpoint=127.0.0.1:{port}"))
        .arg(env!("CARGO_BIN_EXE_motley"))
        .args(tiny(&data, &run, &[set("data.batch_size=2"), set("train.steps=3")].concat()))
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "warn");
    let out = ok(cmd.output().expect("spawn torchrun"), "torchrun … motley train");
    let s: Value = serde_json::from_slice(&out.stdout).expect("rank 0's summary");
    assert_eq!((s["world"].as_u64(), s["steps"].as_u64()), (Some(2), Some(3)), "{s}");
}

/// SIGTERM, as a scheduler preempting the job sends it, to one process or to the `--nproc`
/// launcher (which passes it on): every rank finishes the same step, a checkpoint of that step
/// is written, and the process exits 143 (128 + SIGTERM) with the summary saying so. `--resume`
/// then draws exactly the curve of a run that was never interrupted.
#[test]
fn sigterm_checkpoints_the_step_on_every_rank_and_resume_continues_the_curve() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = corpus(tmp.path(), false);
    // A schedule far longer than the test: the signal always arrives mid-run.
    let long = [set("train.steps=100000"), set("train.eval_every=0"), set("train.checkpoint_every=0")].concat();
    for nproc in [None, Some("2")] {
        let name = nproc.map_or("one".to_string(), |n| format!("nproc{n}"));
        let with_nproc = |mut a: Vec<String>| {
            if let Some(n) = nproc {
                a.extend(args(&["--nproc", n]));
            }
            a
        };
        let run = tmp.path().join(format!("run-{name}"));
        let child = motley()
            .args(with_nproc(tiny(&data, &run, &long)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn motley");
        let t0 = Instant::now();
        while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |s| s.lines().count()) < 3 {
            assert!(t0.elapsed() < Duration::from_secs(120), "{name}: no third step within 2 minutes");
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: kill(2) with our child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let out = wait_within(child, Duration::from_secs(120), "the signalled run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(143), "{name}: {stderr}");
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{name}: {e}: {stderr}"));
        assert_eq!(summary["interrupted"], true, "{summary}");
        let step = summary["steps"].as_u64().expect("steps");
        assert!((3..100_000).contains(&step), "{summary}");
        let ckpts: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
            .expect("checkpoints")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(ckpts, [format!("step-{step:08}")], "{name}: the step it stopped after, checkpointed");
        assert_eq!(metrics(&run).len() as u64, step);

        // Resumed to two steps further = a run that never stopped, stopped there.
        let until = set(&format!("train.stop_at={}", step + 2));
        resume(&run, &with_nproc(until.clone()));
        let reference = tmp.path().join(format!("reference-{name}"));
        train(&with_nproc(tiny(&data, &reference, &[long.clone(), until].concat())));
        assert_eq!(curve(&run), curve(&reference), "{name}: the resumed curve differs from an uninterrupted one");
    }

    // A signal to one rank only (a node's agent, say): the other learns of it through the
    // step's all-reduce and stops after the same step.
    let run = tmp.path().join("run-one-rank-signalled");
    let mut ranks = spawn_ranks(2, torchrun_vars(2, free_port()), |_| tiny(&data, &run, &long));
    let t0 = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |s| s.lines().count()) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no third step within 2 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) with our child's pid.
    assert_eq!(unsafe { libc::kill(ranks[1].id() as i32, libc::SIGTERM) }, 0);
    let outs: Vec<Output> = ranks.drain(..).map(|c| wait_within(c, Duration::from_secs(120), "a rank")).collect();
    for (r, out) in outs.iter().enumerate() {
        assert_eq!(out.status.code(), Some(143), "rank {r}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let summary: Value = serde_json::from_slice(&outs[0].stdout).expect("rank 0's summary");
    let step = summary["steps"].as_u64().expect("steps");
    assert_eq!(summary["interrupted"], true, "{summary}");
    assert_eq!(
        motley_trainer::checkpoint::list(&run).expect("checkpoints").into_iter().map(|(s, _)| s).collect::<Vec<_>>(),
        [step]
    );
}

/// `train.profile_steps` on two ranks: each rank writes torch's trace of the step, with the
/// gradient all-reduce (c10d's `gloo:all_reduce`) in it, and `motley --json profile RUN`
/// summarizes both.
#[test]
fn every_rank_writes_a_profile_trace_and_motley_profile_reads_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    let run = dir.path().join("run");
    let extra =
        [args(&["--nproc", "2"]), set("train.steps=3"), set("train.profile_steps=[2,2]"), set("data.batch_size=2")];
    train(&tiny(&data, &run, &extra.concat()));
    let mut c = motley();
    c.args(["--json", "profile"]).arg(&run);
    let out = ok(c.output().expect("spawn motley"), "motley profile");
    let v: Value = serde_json::from_slice(&out.stdout).expect("profile json");
    let traces = v.as_array().expect("one summary per trace");
    assert_eq!(traces.len(), 2, "{v}");
    for (r, t) in traces.iter().enumerate() {
        assert!(
            t["trace"].as_str().is_some_and(|p| p.ends_with(&format!("steps-2-2/rank-{r:05}.pt.trace.json"))),
            "{t}"
        );
        assert_eq!(t["steps"][0]["step"], 2, "{t}");
        let names = |k: &str| -> Vec<String> {
            t[k].as_array().expect(k).iter().filter_map(|o| o["name"].as_str().map(String::from)).collect()
        };
        assert!(names("ops").iter().any(|n| n == "aten::mm"), "{t}");
        let ranges = names("ranges");
        assert!(
            ranges.iter().any(|n| n == "gloo:all_reduce") && ranges.iter().any(|n| n == "motley::backward"),
            "{ranges:?}"
        );
    }
    // The table names the trace and its operators.
    let mut c = motley();
    c.args(["profile", "--top", "3"]).arg(run.join("profile/steps-2-2/rank-00001.pt.trace.json"));
    let table = String::from_utf8(ok(c.output().expect("spawn motley"), "motley profile").stdout).expect("utf-8");
    assert!(table.contains("rank-00001.pt.trace.json") && table.contains("self ms"), "{table}");
}

/// `--auto-resume`: the same command starts a run (in a folder a run cut off before its first
/// checkpoint left) and, after it stopped at step 4, continues it; when torchrun restarts the ranks (`TORCHELASTIC_RESTART_COUNT`) the command continues
/// even without the flag and with `--overwrite` in it (a restart never wipes the run). Both
/// end on the uninterrupted curve. A command whose model differs from the run's is refused,
/// naming the key.
#[test]
fn auto_resume_makes_one_command_start_or_continue_a_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path(), false);
    let base = [set("train.checkpoint_every=2"), set("train.steps=8")].concat();
    let whole = dir.path().join("whole");
    train(&tiny(&data, &whole, &base));

    // A run cut off before its first checkpoint left a folder: --auto-resume starts over there.
    let run = dir.path().join("auto");
    std::fs::create_dir_all(&run).expect("mkdir");
    std::fs::write(run.join("metrics.jsonl"), "{\"step\": 1}\n").expect("stray metrics");
    let auto = [base.clone(), args(&["--auto-resume"])].concat();
    let s = train(&tiny(&data, &run, &[auto.clone(), set("train.stop_at=4")].concat()));
    assert_eq!(s["steps"].as_u64(), Some(4), "{s}");
    let s = train(&tiny(&data, &run, &auto));
    assert_eq!(s["steps"].as_u64(), Some(8), "{s}");
    assert_curves_close(&curve(&whole), &curve(&run), 1e-6, "--auto-resume");

    // torchrun's restart of a job whose command carries --overwrite: continued, not wiped.
    let restarted = dir.path().join("restarted");
    train(&tiny(&data, &restarted, &[base.clone(), set("train.stop_at=4")].concat()));
    let port = free_port();
    let mut vars = torchrun_vars(1, port)(0);
    vars.push(("TORCHELASTIC_RESTART_COUNT".into(), "1".into()));
    let out = ok(
        motley()
            .args(tiny(&data, &restarted, &[base.clone(), args(&["--overwrite"])].concat()))
            .envs(vars)
            .output()
            .expect("spawn"),
        "a restarted rank",
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("continuing"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_curves_close(&curve(&whole), &curve(&restarted), 1e-5, "torchrun restart");

    let mut c = motley();
    c.args(tiny(&data, &run, &[auto, set("model.d_model=64")].concat()));
    let out = c.output().expect("spawn motley");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("model.d_model: 32 there, 64 here") && err.contains("--overwrite"),
        "{err}"
    );
}
