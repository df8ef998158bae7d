//! Corpora in an object store through the `motley` binary, against moto's S3 server started
//! on 127.0.0.1: `shards merge --out s3://…` uploads, `shards verify|stats` read it back,
//! training from `s3://` gives exactly the losses of training from the local copy, ingest reads
//! inputs from and writes shards to a bucket, runs live there (`train --out|--resume s3://…`),
//! and `bench ingest --remote` measures it.

#[path = "../../remote/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// `motley` pointed at the test server, with no credentials or launch variables inherited.
fn motley(port: u16, cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_motley"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_")
            || k.starts_with("SLURM_")
            || ["RANK", "WORLD_SIZE", "LOCAL_RANK"].contains(&k.as_str())
        {
            c.env_remove(k);
        }
    }
    c.env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true")
        .env("MOTLEY_CACHE_DIR", cache)
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "warn");
    c
}

/// Options that reach the test server directly from this process (listing, fetching).
fn s3_opts(port: u16) -> motley_remote::RemoteOptions {
    common::s3_options(port)
}

fn run(mut c: Command, what: &str) -> Output {
    let out = c.output().expect("run motley");
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn losses(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("metrics line"))
        .map(|r| serde_json::json!([r["step"], r["loss"], r["loss_text"], r["loss_image"], r["loss_speech"]]))
        .collect()
}

fn train(port: u16, cache: &Path, data: &str, out: &Path) {
    train_with(port, cache, data, out, &[]);
}

fn train_with(port: u16, cache: &Path, data: &str, out: &Path, extra: &[&str]) -> Output {
    let mut c = motley(port, cache);
    c.args(["train", "--preset", "tiny", "--data", data, "--out"]).arg(out);
    for s in TINY.iter().chain(extra) {
        c.args(["--set", s]);
    }
    run(c, &format!("train from {data} to {}", out.display()))
}

const TINY: [&str; 15] = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.ffn_multiple_of=16",
    "data.seq_len=64",
    "data.batch_size=4",
    "data.eval_fraction=0.1",
    "optim.warmup_steps=2",
    "train.steps=6",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.checkpoint_every=6",
    "train.device=\"cpu\"",
    "train.threads=1",
];

#[test]
fn train_from_s3_equals_training_from_the_local_copy() {
    let tmp = tempfile::tempdir().expect("tmp");
    let local = tmp.path().join("corpus");
    motley_trainer::loader::write_synthetic_corpus(&local, 300, 5).expect("corpus");
    let server = common::moto().expect("moto server");
    common::create_bucket(server.port, "bkt").expect("bucket");
    let cache = tmp.path().join("cache");
    let uri = "s3://bkt/corpora/synthetic";

    let mut c = motley(server.port, &cache);
    c.args(["--json", "shards", "merge", "--out", uri]).arg(&local);
    let out: Value = serde_json::from_slice(&run(c, "merge --out s3://").stdout).expect("merge json");
    assert_eq!(out["out"], uri);

    let mut c = motley(server.port, &cache);
    c.args(["--json", "shards", "verify", uri]);
    let v: Value = serde_json::from_slice(&run(c, "verify s3://").stdout).expect("verify json");
    assert_eq!(v["ok"], true, "{v}");
    let mut c = motley(server.port, &cache);
    c.args(["--json", "shards", "stats", uri]);
    let s: Value = serde_json::from_slice(&run(c, "stats s3://").stdout).expect("stats json");
    assert!(s.to_string().contains("300"), "{s}");

    train(server.port, &cache, local.to_str().expect("utf-8"), &tmp.path().join("run-local"));
    train(server.port, &tmp.path().join("cache2"), uri, &tmp.path().join("run-s3"));
    let (a, b) = (losses(&tmp.path().join("run-local")), losses(&tmp.path().join("run-s3")));
    assert!(!a.is_empty());
    assert_eq!(a, b, "losses from s3:// differ from the local corpus's");

    // A location with no corpus: an error naming the object.
    let mut c = motley(server.port, &cache);
    c.args(["shards", "verify", "s3://bkt/nothing-here"]);
    let out = c.output().expect("run");
    assert!(!out.status.success());
    let err = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(err.contains("s3://bkt/nothing-here/manifest.json"), "{err}");
}

/// `ingest --out s3://…` uploads each task's shards as the task finishes (deleting them from
/// the staging folder), so a run killed between tasks has them in the bucket and resumes
/// without redoing them; the manifest goes last; the corpus verifies from the bucket.
#[test]
fn ingest_out_to_s3_uploads_zstd_shards_as_tasks_finish_and_the_manifest_last() {
    let tmp = tempfile::tempdir().expect("tmp");
    let text = tmp.path().join("text");
    std::fs::create_dir_all(&text).expect("mkdir");
    for i in 0..6 {
        let body: String =
            (0..200).map(|k| format!("line {k} of file {i}: the quick brown fox {} jumps\n", k * i)).collect();
        std::fs::write(text.join(format!("f{i}.txt")), body).expect("write");
    }
    let server = common::moto().expect("moto server");
    common::create_bucket(server.port, "bkt").expect("bucket");
    let cache = tmp.path().join("cache");
    let tok = tmp.path().join("tok");
    let mut c = motley(server.port, &cache);
    c.args(["tokenizer", "train-text"]).arg(&text).arg("--out").arg(tok.join("text.json"));
    c.args(["--vocab-size", "300"]);
    run(c, "tokenizer train-text");

    // One task per file (options.task_mib), so a run can stop between tasks.
    let recipe = tmp.path().join("recipe.toml");
    let r = format!(
        "[options]\ntask_mib = 0.005\n\n[[source]]\nname = \"text\"\nkind = \"text\"\npaths = [\"{}/*.txt\"]\n",
        text.display()
    );
    std::fs::write(&recipe, r).expect("recipe");
    let uri = "s3://bkt/ingested";
    let ingest = |failpoint: Option<&str>| {
        let mut c = motley(server.port, &cache);
        c.arg("ingest").arg("--config").arg(&recipe).arg("--tokenizers").arg(&tok);
        c.args(["--out", uri, "--json", "--no-progress", "--workers", "1"]);
        if let Some(f) = failpoint {
            c.env("MOTLEY_FAILPOINT", f);
        }
        c.output().expect("run motley")
    };
    // Killed after its second task: those two tasks' shards are in the bucket already (and no
    // longer in the staging folder), the manifest is not.
    let out = ingest(Some("after_task:2"));
    assert_eq!(out.status.code(), Some(86), "{}", String::from_utf8_lossy(&out.stderr));
    let names = |prefix: &str| -> Vec<String> {
        let opts = s3_opts(server.port);
        let list = motley_remote::list_inputs(prefix, &opts).expect("list");
        list.into_iter().map(|(u, _)| u.trim_start_matches(&format!("{prefix}/")).to_string()).collect()
    };
    let early = names(uri);
    assert_eq!(early.iter().filter(|n| n.ends_with(".mshard")).count(), 2, "{early:?}");
    assert!(!early.contains(&"manifest.json".to_string()), "{early:?}");
    let staging = walk(&cache).into_iter().filter(|p| p.extension().is_some_and(|e| e == "mshard")).count();
    assert_eq!(staging, 0, "uploaded shards stay in the staging folder");
    // The same command resumes: the two uploaded tasks are kept, the rest run, then the manifest.
    let out = ingest(None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("ingest json");
    assert_eq!(summary["out"], uri, "{summary}");
    assert_eq!((summary["tasks"].as_u64(), summary["tasks_resumed"].as_u64()), (Some(6), Some(2)), "{summary}");
    assert_eq!(names(uri).iter().filter(|n| n.ends_with(".mshard")).count(), 6);

    let mut c = motley(server.port, &cache);
    c.args(["--json", "shards", "verify", uri]);
    let v: Value = serde_json::from_slice(&run(c, "verify the ingested corpus").stdout).expect("verify json");
    assert_eq!(v["ok"], true, "{v}");
    // The manifest read back from the bucket: zstd shards (the default for object stores).
    let dir = motley_remote::cache_dir_for(
        uri,
        &motley_remote::RemoteOptions { cache_dir: Some(cache.clone()), ..Default::default() },
    );
    let m = motley_shards::Manifest::read(&dir).expect("fetched manifest");
    assert!(m.num_docs > 0 && !m.shards.is_empty());
    assert!(m.shards.iter().all(|s| s.compression == motley_shards::Compression::Zstd), "{:?}", m.shards);
}

/// `motley ingest s3://…/*` reads its inputs from the bucket: text files and a WebDataset tar
/// give the documents the same files give from disk, an error in an object names the object,
/// fetched objects are deleted from the cache when their task ends, and an image source that
/// names a JSONL in a bucket (whose image paths would not be fetched) is refused.
#[test]
fn ingest_reads_inputs_from_s3_like_local_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let local = tmp.path().join("in");
    std::fs::create_dir_all(&local).expect("mkdir");
    let mut files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            let body: String = (0..120).map(|k| format!("line {k} of file {i}: a lazy dog {} naps\n", k * i)).collect();
            (format!("f{i}.txt"), body.into_bytes())
        })
        .collect();
    files.push(("bad.txt".into(), b"valid, then \xff\xfe not UTF-8".to_vec()));
    let mut tar = tar::Builder::new(Vec::new());
    for k in 0..5 {
        let text = format!("sample {k} of the tar: the quick brown fox");
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("{k:06}.txt"), text.as_bytes()).expect("tar member");
    }
    files.push(("shard-000000.tar".into(), tar.into_inner().expect("tar")));
    files.push(("notes.json".into(), b"{\"text\": \"not matched by the globs below\"}\n".to_vec()));

    let server = common::moto().expect("moto server");
    common::create_bucket(server.port, "bkt").expect("bucket");
    let opts = s3_opts(server.port);
    for (name, bytes) in &files {
        std::fs::write(local.join(name), bytes).expect("write");
        motley_remote::put_object(&format!("s3://bkt/in/{name}"), bytes.clone(), &opts).expect("put");
    }
    let cache = tmp.path().join("cache");
    let tok = tmp.path().join("tok");
    let mut c = motley(server.port, &cache);
    c.args(["tokenizer", "train-text"]).arg(local.join("f0.txt")).arg("--out").arg(tok.join("text.json"));
    c.args(["--vocab-size", "300"]);
    run(c, "tokenizer train-text");

    let ingest = |inputs: [String; 2], out: &Path| -> Value {
        let mut c = motley(server.port, &cache);
        c.arg("ingest").args(inputs).arg("--tokenizers").arg(&tok).arg("--out").arg(out);
        c.args(["--json", "--no-progress", "--workers", "2"]);
        serde_json::from_slice(&run(c, "ingest").stdout).expect("ingest json")
    };
    let from_disk = tmp.path().join("from-disk");
    let l = |p: &str| local.join(p).display().to_string();
    let a = ingest([l("*.txt"), l("*.tar")], &from_disk);
    let from_s3 = tmp.path().join("from-s3");
    let b = ingest(["s3://bkt/in/*.txt".into(), "s3://bkt/in/*.tar".into()], &from_s3);
    assert_eq!(
        (a["documents"].as_u64(), a["errors"].as_u64()),
        (b["documents"].as_u64(), b["errors"].as_u64()),
        "{a}\n{b}"
    );
    assert!(b["documents"].as_u64().is_some_and(|d| d > 5), "{b}");
    let docs = |dir: &Path| {
        let c = motley_shards::Corpus::open(dir).expect("corpus");
        (0..c.num_docs()).map(|i| c.get(i).expect("doc").to_owned().segments).collect::<Vec<_>>()
    };
    assert_eq!(docs(&from_disk), docs(&from_s3));
    let errors = std::fs::read_to_string(from_s3.join("errors.jsonl")).expect("errors.jsonl");
    assert!(errors.contains("s3://bkt/in/bad.txt"), "{errors}");
    // Every fetched object is gone from the cache once its task finished.
    let left: Vec<_> = walk(&cache.join("inputs"));
    assert!(left.is_empty(), "{left:?}");

    // An image source cannot take a JSONL from a bucket: the files it names are not fetched.
    let mut c = motley(server.port, &cache);
    c.args(["ingest", "s3://bkt/in/*.json", "--kind", "image", "--tokenizers"]).arg(&tok);
    c.arg("--out").arg(tmp.path().join("refused"));
    let out = c.output().expect("run motley");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("s3://bkt/in/notes.json") && err.contains("WebDataset"), "{err}");
}

/// A temporary folder with a small synthetic corpus in it, and a moto server with bucket `bkt`.
fn training_setup() -> (tempfile::TempDir, PathBuf, common::Server) {
    let tmp = tempfile::tempdir().expect("tmp");
    let corpus = tmp.path().join("corpus");
    motley_trainer::loader::write_synthetic_corpus(&corpus, 300, 5).expect("corpus");
    let server = common::moto().expect("moto server");
    common::create_bucket(server.port, "bkt").expect("bucket");
    (tmp, corpus, server)
}

/// `train --out s3://…` copies each checkpoint and the run's files to the bucket as they are
/// written, pruned to `keep_checkpoints` there too; `train --resume s3://…` on a machine that
/// has none of it (a fresh cache: neither the run nor its corpus, which is in the bucket too)
/// fetches the latest checkpoint and the corpus and continues the same loss curve an
/// uninterrupted local run draws; `eval --checkpoint s3://…` reads a run or one checkpoint
/// from the bucket; a second fresh run at the same location is refused.
#[test]
fn train_out_to_s3_copies_checkpoints_and_resumes_from_the_bucket() {
    let (tmp, corpus, server) = training_setup();
    let data = corpus.to_str().expect("utf-8");
    let steps = ["train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=2"];
    let uri = "s3://bkt/runs/a";

    let local = tmp.path().join("run-local");
    train_with(server.port, &tmp.path().join("cache0"), data, &local, &steps);
    // The bucket run reads the same corpus from the bucket.
    let mut c = motley(server.port, &tmp.path().join("cache0"));
    c.args(["shards", "merge", "--out", "s3://bkt/corpora/c"]).arg(&corpus);
    run(c, "merge --out s3://");
    let mut first = steps.to_vec();
    first.push("train.stop_at=4");
    train_with(server.port, &tmp.path().join("cache1"), "s3://bkt/corpora/c", Path::new(uri), &first);
    // Nothing of the first machine's cache (staging folder, cached corpus) is left.
    std::fs::remove_dir_all(tmp.path().join("cache1")).expect("rm cache1");

    let opts = s3_opts(server.port);
    let objects = || -> Vec<String> {
        motley_remote::list_inputs(uri, &opts)
            .expect("list the run")
            .into_iter()
            .map(|(u, _)| u.trim_start_matches("s3://bkt/runs/a/").to_string())
            .collect()
    };
    let ckpt = |step: u32| {
        ["meta.json", "model.safetensors", "optimizer.safetensors"]
            .map(|f| format!("checkpoints/step-{step:08}/{f}"))
            .to_vec()
    };
    let mut want: Vec<String> = [ckpt(2), ckpt(4)].concat();
    want.extend(["config.toml", "losses.png", "metrics.jsonl"].map(String::from));
    want.sort();
    assert_eq!(objects(), want, "the bucket after 4 of 8 steps");

    // Another machine (a fresh cache) resumes from the bucket.
    let mut c = motley(server.port, &tmp.path().join("cache2"));
    c.args(["train", "--resume", uri, "--set", "train.stop_at=0"]);
    run(c, "train --resume s3://");
    let mut want: Vec<String> = [ckpt(6), ckpt(8)].concat();
    want.extend(["config.toml", "losses.png", "metrics.jsonl"].map(String::from));
    want.sort();
    assert_eq!(objects(), want, "the bucket after 8 steps: older checkpoints pruned there too");
    let fetched = tmp.path().join("fetched");
    std::fs::create_dir_all(&fetched).expect("mkdir");
    let metrics = fetched.join("metrics.jsonl");
    let size = motley_remote::list_inputs(&format!("{uri}/metrics.jsonl"), &opts).expect("list")[0].1;
    motley_remote::fetch_input(&format!("{uri}/metrics.jsonl"), size, &metrics, &opts)
        .expect("metrics.jsonl from the bucket");
    assert_eq!(losses(&fetched), losses(&local), "the resumed run's curve differs from the uninterrupted one");

    let eval = |checkpoint: &str, cache: &str| -> Value {
        let mut c = motley(server.port, &tmp.path().join(cache));
        c.args(["--json", "eval", "--checkpoint", checkpoint, "--batches", "2", "--device", "cpu"]);
        serde_json::from_slice(&run(c, "eval").stdout).expect("eval json")
    };
    let (here, there) = (eval(local.to_str().expect("utf-8"), "cache3"), eval(uri, "cache3"));
    assert_eq!((&here["step"], &here["loss"]), (&there["step"], &there["loss"]), "{here}\n{there}");
    let six = eval(&format!("{uri}/checkpoints/step-00000006"), "cache4");
    assert_eq!(six["step"], 6, "{six}");

    // A fresh run at a location that holds one is refused, naming it.
    let mut c = motley(server.port, &tmp.path().join("cache5"));
    c.args(["train", "--preset", "tiny", "--data", data, "--out", uri]);
    let out = c.output().expect("run motley");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(uri) && err.contains("--overwrite"), "{err}");
}

#[test]
fn per_rank_checkpoints_are_copied_to_s3_and_resume_from_there_on_two_ranks() {
    let (tmp, corpus, server) = training_setup();
    let data = corpus.to_str().expect("utf-8");
    let uri = "s3://bkt/runs/p";
    let sets = ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=1", "train.stop_at=2"];
    let per_rank = "train.checkpoint_format=\"per_rank\"";
    train_with(server.port, &tmp.path().join("cache1"), data, Path::new(uri), &[&sets[..], &[per_rank]].concat());
    let opts = s3_opts(server.port);
    let objects = || -> Vec<String> {
        let mut v: Vec<String> = motley_remote::list_inputs(uri, &opts)
            .expect("list the run")
            .into_iter()
            .map(|(u, _)| u.trim_start_matches("s3://bkt/runs/p/").to_string())
            .filter(|u| u.starts_with("checkpoints/"))
            .collect();
        v.sort();
        v
    };
    let ckpt = |step: u32, world: usize| {
        let mut v = vec!["meta.json".to_string(), "ranks.json".to_string()];
        for r in 0..world {
            v.push(format!("model-rank-{r:05}-of-{world:05}.safetensors"));
            v.push(format!("optimizer-rank-{r:05}-of-{world:05}.safetensors"));
        }
        let mut v: Vec<String> = v.into_iter().map(|f| format!("checkpoints/step-{step:08}/{f}")).collect();
        v.sort();
        v
    };
    assert_eq!(objects(), ckpt(2, 1), "one rank's files in the bucket");
    // Another machine resumes the one-rank checkpoint on two ranks, from the bucket.
    let mut c = motley(server.port, &tmp.path().join("cache2"));
    c.args(["train", "--resume", uri, "--nproc", "2", "--set", "train.stop_at=0", "--set", "data.batch_size=2"]);
    run(c, "train --resume s3:// --nproc 2");
    assert_eq!(objects(), ckpt(4, 2), "both ranks' files, the older checkpoint pruned");
    // Eval fetches the weights' files only.
    let cache = tmp.path().join("cache3");
    let mut c = motley(server.port, &cache);
    c.args(["--json", "eval", "--checkpoint", uri, "--batches", "1", "--device", "cpu"]);
    let v: Value = serde_json::from_slice(&run(c, "eval").stdout).expect("eval json");
    assert_eq!(v["step"], 4, "{v}");
    let fetched: Vec<String> = walk(&cache).iter().map(|p| p.display().to_string()).collect();
    assert!(fetched.iter().any(|p| p.ends_with("model-rank-00001-of-00002.safetensors")), "{fetched:?}");
    assert!(!fetched.iter().any(|p| p.contains("optimizer-rank")), "{fetched:?}");
}

/// Two nodes that share no disk (each rank its own cache, so its own staging folder) train
/// with per-rank checkpoints to a bucket: each rank copies its own files there and rank 0 adds
/// the index and `meta.json` once both have; the other node keeps no checkpoint folder. Two
/// fresh nodes resume from the bucket and end on the curve of an uninterrupted local run.
#[test]
fn per_rank_checkpoints_need_no_shared_disk_between_nodes() {
    let (tmp, corpus, server) = training_setup();
    let data = corpus.to_str().expect("utf-8");
    let uri = "s3://bkt/runs/nodes";
    let sets = [
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=1",
        "train.checkpoint_format=\"per_rank\"",
        "train.zero=1",
        "data.batch_size=2",
        "train.tensorboard=true",
        "train.profile_steps=[5,5]",
    ];
    let local = tmp.path().join("run-local");
    let mut c = motley(server.port, &tmp.path().join("cache-local"));
    c.args(["train", "--preset", "tiny", "--nproc", "2", "--data", data, "--out"]).arg(&local);
    for s in TINY.iter().chain(&sets) {
        c.args(["--set", s]);
    }
    run(c, "train --nproc 2 (local, uninterrupted)");

    // Rank r runs on "node" r: its own cache, launched as a cluster's launcher starts it.
    let nodes = |caches: [&str; 2], args: &[&str]| {
        let port = common::free_port().expect("port");
        let children: Vec<_> = (0..2)
            .map(|r| {
                let mut c = motley(server.port, &tmp.path().join(caches[r]));
                c.args(args).envs([
                    ("RANK", r.to_string()),
                    ("WORLD_SIZE", "2".into()),
                    ("LOCAL_RANK", "0".into()),
                    ("LOCAL_WORLD_SIZE", "1".into()),
                    ("MASTER_ADDR", "127.0.0.1".into()),
                    ("MASTER_PORT", port.to_string()),
                ]);
                c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("spawn rank")
            })
            .collect();
        for (r, child) in children.into_iter().enumerate() {
            let out = child.wait_with_output().expect("wait for rank");
            assert!(out.status.success(), "rank {r} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
    };
    let mut first = vec!["train", "--preset", "tiny", "--data", data, "--out", uri];
    for s in TINY.iter().chain(&sets).chain(&["train.stop_at=4"]) {
        first.extend(["--set", s]);
    }
    nodes(["node0", "node1"], &first);
    let opts = s3_opts(server.port);
    let objects: Vec<String> = motley_remote::list_inputs(&format!("{uri}/checkpoints"), &opts)
        .expect("list")
        .into_iter()
        .map(|(u, _)| u.trim_start_matches(&format!("{uri}/checkpoints/")).to_string())
        .collect();
    let mut want: Vec<String> = ["meta.json", "ranks.json"]
        .into_iter()
        .map(String::from)
        .chain(motley_trainer::per_rank::rank_files(2))
        .map(|f| format!("step-00000004/{f}"))
        .collect();
    want.sort();
    assert_eq!(objects, want, "both ranks' files in the bucket, step 2 pruned");
    // Node 1 kept nothing of the checkpoints it copied; node 0 has its own files only.
    let staged = |node: &str| -> Vec<String> {
        walk(&tmp.path().join(node))
            .iter()
            .map(|p| p.display().to_string())
            .filter(|p| p.contains("checkpoints"))
            .collect()
    };
    assert!(staged("node1").is_empty(), "{:?}", staged("node1"));
    let zero = staged("node0");
    assert!(zero.iter().any(|p| p.ends_with("step-00000004/model-rank-00000-of-00002.safetensors")), "{zero:?}");
    assert!(!zero.iter().any(|p| p.contains("rank-00001")), "{zero:?}");

    // Two fresh nodes resume from the bucket (each fetches the checkpoint).
    nodes(["node2", "node3"], &["train", "--resume", uri, "--set", "train.stop_at=0"]);
    let fetched = tmp.path().join("fetched");
    let size = motley_remote::list_inputs(&format!("{uri}/metrics.jsonl"), &opts).expect("list")[0].1;
    motley_remote::fetch_input(&format!("{uri}/metrics.jsonl"), size, &fetched.join("metrics.jsonl"), &opts)
        .expect("metrics.jsonl from the bucket");
    // Each rank's profile of step 5 (the resumed run's), copied by the rank itself.
    let traces = motley_remote::list_inputs(&format!("{uri}/profile"), &opts).expect("list profile/");
    let names: Vec<&str> = traces.iter().map(|(u, _)| u.rsplit('/').next().unwrap_or("")).collect();
    assert_eq!(names, ["rank-00000.pt.trace.json", "rank-00001.pt.trace.json"], "{traces:?}");
    // `motley profile` reads them there.
    let mut c = motley(server.port, &tmp.path().join("cache-profile"));
    c.args(["--json", "profile", uri]);
    let v: Value = serde_json::from_slice(&run(c, "profile s3://").stdout).expect("profile json");
    let read: Vec<&str> = v.as_array().expect("summaries").iter().filter_map(|t| t["trace"].as_str()).collect();
    assert_eq!(read, traces.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>(), "{v}");
    assert!(v[0]["steps"][0]["step"] == 5 && v[1]["ops"].as_array().is_some_and(|o| !o.is_empty()), "{v}");
    // Both processes' TensorBoard event files are there too.
    let events = motley_remote::list_inputs(&format!("{uri}/tensorboard"), &opts).expect("list tensorboard/");
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.iter().all(|(u, size)| u.contains("/events.out.tfevents.") && *size > 0), "{events:?}");
    let (a, b) = (losses(&local), losses(&fetched));
    assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
    for (x, y) in a.iter().zip(&b) {
        for (p, q) in x.as_array().expect("row").iter().zip(y.as_array().expect("row")) {
            match (p.as_f64(), q.as_f64()) {
                (Some(p), Some(q)) => assert!((p - q).abs() <= 1e-5 * p.abs().max(1.0), "{x} vs {y}"),
                _ => assert_eq!(p, q, "{x} vs {y}"),
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
        }
    }
    out
}

/// `motley bench ingest --remote s3://…` uploads its inputs and ingests them from the bucket
/// one object at a time and with fetch-ahead, against the files on disk: the same tokens on
/// all three sides, and every timing reported.
#[test]
fn bench_ingest_remote_reads_the_same_tokens_three_ways() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = common::moto().expect("moto server");
    common::create_bucket(server.port, "bkt").expect("bucket");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut c = motley(server.port, &tmp.path().join("cache"));
    c.current_dir(&repo).args(["--json", "bench", "ingest", "--remote", "s3://bkt/bench", "--files", "24"]);
    c.args(["--copies", "1", "--repeat", "1", "--fetch-ahead", "3", "--work-dir"]).arg(tmp.path().join("work"));
    let r: Value = serde_json::from_slice(&run(c, "bench ingest --remote").stdout).expect("bench json");
    assert_eq!(r["same_tokens"], true, "{r}");
    assert!(r["objects"].as_u64().is_some_and(|n| n >= 20), "{r}");
    for side in ["local_files", "remote_one_at_a_time", "remote_fetch_ahead"] {
        assert!(r[side]["tokens_per_s"].as_f64().is_some_and(|v| v > 0.0), "{side}: {r}");
    }
    assert!(r["ratio_fetch_ahead_vs_one_at_a_time"].as_f64().is_some_and(|v| v > 0.0), "{r}");
}

/// `motley bench fetch --remote s3://…` uploads one object, fetches it with one range stream
/// and with several, checks the bytes both times and removes the object.
#[test]
fn bench_fetch_times_one_stream_against_several() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = common::moto().expect("moto server");
    common::create_bucket(server.port, "bkt").expect("bucket");
    let mut c = motley(server.port, &tmp.path().join("cache"));
    c.args(["--json", "bench", "fetch", "--remote", "s3://bkt/bench", "--mb", "4", "--range-mb", "1"]);
    c.args(["--streams", "3", "--repeat", "1"]);
    let r: Value = serde_json::from_slice(&run(c, "bench fetch").stdout).expect("bench json");
    assert_eq!((r["same_bytes"].as_bool(), r["bytes"].as_u64()), (Some(true), Some(4 << 20)), "{r}");
    assert_eq!((r["one_stream"]["streams"].as_u64(), r["streams"]["streams"].as_u64()), (Some(1), Some(3)), "{r}");
    for side in ["one_stream", "streams"] {
        assert!(r[side]["mb_per_s"].as_f64().is_some_and(|v| v > 0.0), "{side}: {r}");
    }
    assert!(r["ratio_streams_vs_one"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    let left = motley_remote::list_inputs("s3://bkt/bench", &s3_opts(server.port)).expect("list");
    assert!(left.is_empty(), "{left:?}");
}
