//! Integration tests of `motley shards ...`: a fixture corpus is built deterministically with
//! the shards writer, then the binary is run on it (snapshots of `stats --json` and `head`,
//! planted corruptions for `verify`, pyarrow reading `export-parquet`, `merge`, and `decode`
//! of a sample document through real fitted tokenizers).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use motley_shards::{CorpusWriter, Document, Manifest, Modality, Segment, SegmentMeta, Vocab, WriterProperties};
use serde_json::{Value, json};

type TestResult = anyhow::Result<()>;

fn motley(args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_motley")).args(args).env("RUST_LOG", "warn").output()?)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(args: &[&str]) -> anyhow::Result<String> {
    let o = motley(args)?;
    anyhow::ensure!(o.status.success(), "motley {args:?} failed: {}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    Ok(stdout(&o))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Words of the fixture's word-level text tokenizer (id = position).
const WORDS: [&str; 12] = ["[UNK]", "the", "digit", "seven", "is", "here", "a", "sound", "of", "two", "and", "."];

/// A tiny HF word-level `tokenizer.json`: decoding joins words with spaces, deterministically.
fn wordlevel_json() -> String {
    let vocab: serde_json::Map<String, Value> =
        WORDS.iter().enumerate().map(|(i, w)| ((*w).to_string(), json!(i))).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}

/// A fixed linear congruential generator, so the fixture is the same on every machine.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u32) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as u32
    }
}

fn fixture_vocab() -> Vocab {
    Vocab::build(WORDS.len() as u32, 16, 8, None)
}

fn fixture_docs() -> Vec<Document> {
    let mut r = Lcg(7);
    let mut docs = Vec::new();
    for d in 0..12u32 {
        let mut segs = Vec::new();
        let n = 1 + r.next(8) as usize;
        segs.push(Segment::tokens(Modality::Text, (0..n).map(|_| 1 + r.next(11)).collect()));
        if d % 3 == 0 {
            let ids = (0..16).map(|_| r.next(16)).collect();
            let meta = SegmentMeta { grid: Some((4, 4)), frame_rate: None, source: Some(format!("images/{d:02}.png")) };
            segs.push(Segment::tokens(Modality::Image, ids).with_meta(meta));
        }
        if d % 2 == 1 {
            let n = 5 + r.next(60) as usize;
            let meta = SegmentMeta { grid: None, frame_rate: Some(25.0), source: Some(format!("speech/{d:02}.wav")) };
            segs.push(Segment::tokens(Modality::Speech, (0..n).map(|_| r.next(8)).collect()).with_meta(meta));
        }
        if d % 4 == 2 {
            segs.push(Segment::tokens(Modality::Text, (0..3).map(|_| 1 + r.next(11)).collect()));
            let meta = SegmentMeta { grid: Some((4, 4)), frame_rate: None, source: None };
            segs.push(Segment::tokens(Modality::Image, (0..16).map(|_| r.next(16)).collect()).with_meta(meta));
        }
        docs.push(Document::new(segs));
    }
    docs
}

/// Writes the fixture corpus (several shards, several chunks each) with its text tokenizer.
fn build_fixture(dir: &Path) -> anyhow::Result<Vec<Document>> {
    build_fixture_named(dir, "fixture")
}

fn build_fixture_named(dir: &Path, prefix: &str) -> anyhow::Result<Vec<Document>> {
    let docs = fixture_docs();
    let props = WriterProperties::builder().chunk_size(256).max_shard_bytes(2048).build();
    let mut w = CorpusWriter::create(dir, &fixture_vocab(), props, prefix)?;
    for d in &docs {
        w.add_document(d)?;
    }
    let mut m = w.finish_with_manifest()?;
    std::fs::write(dir.join("text.json"), wordlevel_json())?;
    m.tokenizers.insert("text".into(), json!("text.json"));
    m.write(dir)?;
    Ok(docs)
}

#[test]
fn stats_json_snapshot() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("corpus");
    build_fixture(&dir)?;
    let manifest = Manifest::read(&dir)?;
    assert!(manifest.shards.len() >= 2, "the fixture spans several shards");
    let mut v: Value = serde_json::from_str(&ok(&["shards", "stats", s(&dir), "--deep", "--json"])?)?;
    // Byte counts depend on the shard layout's details: check them here, keep them out of the snapshot.
    assert_eq!(v["bytes"]["compressed"], json!(manifest.bytes));
    let raw: u64 = manifest.shards.iter().map(|s| s.payload_bytes).sum();
    assert_eq!(v["bytes"]["raw"], json!(raw));
    v["bytes"] = json!("[checked against the manifest]");
    insta::assert_json_snapshot!("stats_deep", v);

    // The manifest-only path gives the same totals, without the deep section.
    let fast: Value = serde_json::from_str(&ok(&["shards", "stats", s(&dir), "--json"])?)?;
    assert_eq!(fast["modalities"], v["modalities"]);
    assert_eq!(fast["deep"], Value::Null);
    let text = ok(&["shards", "stats", s(&dir), "--deep"])?;
    assert!(text.contains("documents  12"), "{text}");
    Ok(())
}

#[test]
fn head_snapshot() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("corpus");
    build_fixture(&dir)?;
    let out = ok(&["shards", "head", s(&dir), "-n", "4"])?;
    insta::assert_snapshot!("head_n4", out);
    let one = ok(&["shards", "head", s(&dir), "--doc", "6"])?;
    insta::assert_snapshot!("head_doc6", one);
    let v: Value = serde_json::from_str(&ok(&["shards", "head", s(&dir), "--doc", "3", "--json"])?)?;
    assert_eq!(v[0]["doc"], json!(3));
    assert_eq!(v[0]["segments"][2]["modality"], json!("speech"));
    assert_eq!(v[0]["segments"][2]["seconds"], json!(2.08));
    // Without the tokenizer, text shows as ids.
    std::fs::remove_file(dir.join("text.json"))?;
    let ids = ok(&["shards", "head", s(&dir), "-n", "1"])?;
    assert!(ids.contains("ids ["), "{ids}");
    // A document past the end is an error.
    let bad = motley(&["shards", "head", s(&dir), "--doc", "99"])?;
    assert!(!bad.status.success());
    Ok(())
}

/// Hash of every file in `dir`, to show verify changes nothing.
fn snapshot_dir(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        v.push((p.clone(), std::fs::read(&p)?));
    }
    v.sort();
    Ok(v)
}

fn verify_json(dir: &Path) -> anyhow::Result<(bool, Value)> {
    let o = motley(&["shards", "verify", s(dir), "--json"])?;
    Ok((o.status.success(), serde_json::from_str(&stdout(&o))?))
}

fn kinds(v: &Value) -> Vec<String> {
    v["problems"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["kind"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

#[test]
fn verify_passes_clean_and_catches_each_corruption() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let clean = tmp.path().join("clean");
    build_fixture(&clean)?;
    let before = snapshot_dir(&clean)?;
    let (good, v) = verify_json(&clean)?;
    assert!(good, "{v}");
    assert_eq!(v["ok"], json!(true));
    assert_eq!(v["docs"], json!(12));
    assert_eq!(snapshot_dir(&clean)?, before, "verify never modifies the corpus");
    let human = ok(&["shards", "verify", s(&clean)])?;
    assert!(human.starts_with("OK:"), "{human}");

    let fresh = |name: &str| -> anyhow::Result<(PathBuf, String)> {
        let d = tmp.path().join(name);
        build_fixture(&d)?;
        let shard = Manifest::read(&d)?.shards[1].name.clone();
        Ok((d, shard))
    };

    // 1. One bit flipped inside the first chunk's payload.
    let (d, shard) = fresh("bitflip")?;
    let p = d.join(&shard);
    let mut bytes = std::fs::read(&p)?;
    bytes[64 + 40] ^= 0x10;
    std::fs::write(&p, &bytes)?;
    let before = snapshot_dir(&d)?;
    let (good, v) = verify_json(&d)?;
    assert!(!good, "{v}");
    assert!(kinds(&v).iter().any(|k| k == "checksum"), "{v}");
    let problems = v["problems"].as_array().cloned().unwrap_or_default();
    assert!(problems.iter().all(|p| p["shard"] == json!(shard)), "{v}");
    assert!(problems.iter().any(|p| p["offset"].as_u64().is_some_and(|o| o > 0)), "a byte offset is named: {v}");
    assert_eq!(snapshot_dir(&d)?, before, "verify never modifies the corpus");
    let o = motley(&["shards", "verify", s(&d)])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains(&format!("{shard} @ ")), "{}", stdout(&o));

    // 2. A truncated shard.
    let (d, shard) = fresh("truncated")?;
    let p = d.join(&shard);
    let len = std::fs::metadata(&p)?.len();
    std::fs::OpenOptions::new().write(true).open(&p)?.set_len(len / 2)?;
    let (good, v) = verify_json(&d)?;
    assert!(!good, "{v}");
    assert!(v["problems"].as_array().is_some_and(|a| a.iter().any(|p| p["shard"] == json!(shard))), "{v}");

    // 3. A missing shard.
    let (d, shard) = fresh("missing")?;
    std::fs::remove_file(d.join(&shard))?;
    let (good, v) = verify_json(&d)?;
    assert!(!good, "{v}");
    assert!(kinds(&v).iter().any(|k| k == "missing_shard"), "{v}");

    // 4. A manifest total that does not add up.
    let (d, _) = fresh("total")?;
    let mp = d.join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mp)?)?;
    m["totals"]["text"]["tokens"] = json!(m["totals"]["text"]["tokens"].as_u64().unwrap_or(0) + 1);
    std::fs::write(&mp, serde_json::to_vec_pretty(&m)?)?;
    let (good, v) = verify_json(&d)?;
    assert!(!good, "{v}");
    assert_eq!(kinds(&v), vec!["manifest".to_string()], "only the manifest is wrong: {v}");
    assert!(v["docs"].as_u64() == Some(12), "the shards are still checked: {v}");

    // 5. A shard entry whose document count disagrees with the shard (totals kept consistent).
    let (d, shard) = fresh("entry")?;
    let mp = d.join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mp)?)?;
    m["shards"][1]["num_docs"] = json!(m["shards"][1]["num_docs"].as_u64().unwrap_or(0) + 1);
    m["num_docs"] = json!(m["num_docs"].as_u64().unwrap_or(0) + 1);
    std::fs::write(&mp, serde_json::to_vec_pretty(&m)?)?;
    let (good, v) = verify_json(&d)?;
    assert!(!good, "{v}");
    assert!(v["problems"].as_array().is_some_and(|a| a.iter().any(|p| p["shard"] == json!(shard))), "{v}");
    Ok(())
}

/// A python with pyarrow: `$MOTLEY_PYTHON`, else the repository's `.venv`.
fn python_with_pyarrow() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("MOTLEY_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    candidates
        .into_iter()
        .find(|p| Command::new(p).args(["-c", "import pyarrow.parquet"]).output().is_ok_and(|o| o.status.success()))
}

#[test]
fn export_parquet_reads_back_in_pyarrow() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("corpus");
    let docs = build_fixture(&dir)?;
    let out = tmp.path().join("segments.parquet");
    let v: Value = serde_json::from_str(&ok(&["shards", "export-parquet", s(&dir), "--out", s(&out), "--json"])?)?;
    let n_segments: usize = docs.iter().map(|d| d.segments.len()).sum();
    assert_eq!(v["rows"], json!(n_segments));
    assert!(out.is_file() && !tmp.path().join("segments.parquet.tmp").exists());

    let Some(py) = python_with_pyarrow() else {
        eprintln!("NOTICE: skipping the pyarrow read-back: no python with pyarrow ($MOTLEY_PYTHON or .venv)");
        return Ok(());
    };
    let script = r#"
import json, sys
import pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
print(json.dumps({
    "rows": t.num_rows,
    "columns": t.column_names,
    "doc": t.column("doc").to_pylist(),
    "segment": t.column("segment").to_pylist(),
    "modality": t.column("modality").to_pylist(),
    "tokens": t.column("tokens").to_pylist(),
    "ids": t.column("ids").to_pylist(),
    "source": t.column("source").to_pylist(),
}))
"#;
    let o = Command::new(&py).args(["-c", script, s(&out)]).output()?;
    anyhow::ensure!(o.status.success(), "pyarrow failed: {}", String::from_utf8_lossy(&o.stderr));
    let got: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(got["rows"], json!(n_segments));
    assert_eq!(got["columns"], json!(["doc", "segment", "modality", "tokens", "source", "ids"]));
    let mut row = 0;
    for (d, doc) in docs.iter().enumerate() {
        for (i, seg) in doc.segments.iter().enumerate() {
            let motley_shards::SegmentData::Tokens(ids) = &seg.data else { anyhow::bail!("fixture is discrete") };
            assert_eq!(got["doc"][row], json!(d), "row {row}");
            assert_eq!(got["segment"][row], json!(i), "row {row}");
            assert_eq!(got["modality"][row], json!(seg.modality.as_str()), "row {row}");
            assert_eq!(got["tokens"][row], json!(ids.len()), "row {row}");
            assert_eq!(got["ids"][row], json!(ids), "row {row}");
            assert_eq!(got["source"][row], json!(seg.meta.source), "row {row}");
            row += 1;
        }
    }
    Ok(())
}

#[test]
fn merge_joins_parts_with_hard_links() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let docs_a = build_fixture_named(&a, "part0")?;
    let docs_b = build_fixture(&b)?;
    let out = tmp.path().join("merged");
    let v: Value = serde_json::from_str(&ok(&["shards", "merge", s(&a), s(&b), "--out", s(&out), "--json"])?)?;
    assert_eq!(v["documents"], json!(docs_a.len() + docs_b.len()));
    assert_eq!(v["copied"], json!(0), "same filesystem: hard links, no copy");
    ok(&["shards", "verify", s(&out)])?;
    // Same names in two inputs get a part prefix.
    let out2 = tmp.path().join("merged2");
    ok(&["shards", "merge", s(&b), s(&b), "--out", s(&out2)])?;
    ok(&["shards", "verify", s(&out2)])?;
    let head = ok(&["shards", "head", s(&out2), "--doc", "12", "--json"])?;
    let first = ok(&["shards", "head", s(&b), "--doc", "0", "--json"])?;
    let (h, f): (Value, Value) = (serde_json::from_str(&head)?, serde_json::from_str(&first)?);
    assert_eq!(h[0]["segments"], f[0]["segments"], "document 12 of the merge is document 0 of the second input");

    // Across filesystems (tmpfs /dev/shm vs the temp dir) linking fails and shards are copied.
    let shm = Path::new("/dev/shm");
    let other_fs = {
        use std::os::unix::fs::MetadataExt;
        shm.is_dir() && std::fs::metadata(shm)?.dev() != std::fs::metadata(tmp.path())?.dev()
    };
    if other_fs {
        let far = tempfile::tempdir_in(shm)?;
        let src = far.path().join("a");
        build_fixture(&src)?;
        let out4 = tmp.path().join("merged4");
        let v: Value = serde_json::from_str(&ok(&["shards", "merge", s(&src), "--out", s(&out4), "--json"])?)?;
        assert_eq!(v["linked"], json!(0), "{v}");
        assert!(v["copied"].as_u64().is_some_and(|c| c > 0), "{v}");
        ok(&["shards", "verify", s(&out4)])?;
        assert!(out4.join("text.json").is_file(), "the tokenizer file comes along");
    } else {
        eprintln!("NOTICE: no second filesystem at /dev/shm; the copy fallback of merge is not exercised");
    }

    // Different vocabularies are refused, and nothing is written.
    let c = tmp.path().join("c");
    let mut w = CorpusWriter::create(&c, &Vocab::build(99, 16, 8, None), WriterProperties::default(), "c")?;
    w.add_document(&Document::new(vec![Segment::tokens(Modality::Text, vec![1, 2])]))?;
    w.finish_with_manifest()?;
    let out3 = tmp.path().join("merged3");
    let o = motley(&["shards", "merge", s(&a), s(&c), "--out", s(&out3)])?;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("vocabularies differ"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out3.join("manifest.json").exists());
    Ok(())
}

/// The bundled sample corpus (data/sample).
fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/sample")
}

/// Ingests the first interleaved sample document (text, image, text, speech) the way ingest
/// does: tokenizers fitted on a few sample files, the document encoded part by part, the
/// tokenizer files copied into the corpus and named in its manifest.
fn ingest_sample_doc(dir: &Path) -> anyhow::Result<()> {
    use motley_tokenizers::{
        AudioTokenizer, ImageTokenizer, SpeechConfig, SpeechTokenizer, TextTokenizer, TextTrainConfig, VqConfig,
        VqImageTokenizer,
    };
    let line = std::fs::read_to_string(sample().join("interleaved.jsonl"))?;
    let first: Value = serde_json::from_str(line.lines().next().unwrap_or_default())?;
    let parts = first["parts"].as_array().cloned().unwrap_or_default();

    let tok = tempfile::tempdir()?;
    let text_src = tok.path().join("text.txt");
    let texts: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
    std::fs::write(&text_src, texts.join("\n").repeat(4))?;
    let cfg = TextTrainConfig { vocab_size: 300, min_frequency: 1, ..TextTrainConfig::default() };
    let (text, _) = TextTokenizer::train(&[text_src], &cfg)?;

    let images: Vec<PathBuf> = (1700..1716).map(|i| sample().join(format!("images/{i:05}.png"))).collect();
    let vq_cfg = VqConfig { codebook_size: 16, max_iter: 5, holdout: 0.0, ..VqConfig::default() };
    let (vq, _) = VqImageTokenizer::fit_files(&images, &vq_cfg, &indicatif::ProgressBar::hidden())?;

    let clips: Vec<PathBuf> = parts.iter().filter_map(|p| p["audio"].as_str()).map(|a| sample().join(a)).collect();
    let sp_cfg = SpeechConfig { units: 8, max_iter: 5, ..SpeechConfig::default() };
    let (speech, _) = SpeechTokenizer::fit_files(&clips, &sp_cfg, &indicatif::ProgressBar::hidden())?;

    let mut segs = Vec::new();
    for p in &parts {
        if let Some(t) = p["text"].as_str() {
            segs.push(text.encode_segment(t, None)?);
        } else if let Some(i) = p["image"].as_str() {
            segs.push(vq.encode_file(&sample().join(i))?);
        } else if let Some(a) = p["audio"].as_str() {
            segs.push(speech.encode_file(&sample().join(a))?);
        }
    }
    let vocab = Vocab::build(text.vocab_size(), ImageTokenizer::vocab_size(&vq), speech.vocab_size(), None);
    let mut w = CorpusWriter::create(dir, &vocab, WriterProperties::default(), "sample")?;
    w.add_document(&Document::new(segs))?;
    let mut m = w.finish_with_manifest()?;
    text.save(dir.join("text.json"))?;
    ImageTokenizer::save(&vq, &dir.join("image.safetensors"))?;
    speech.save(dir.join("speech.safetensors"))?;
    m.tokenizers.insert("text".into(), json!("text.json"));
    m.tokenizers.insert("image".into(), json!({"file": "image.safetensors", "kind": "vq"}));
    m.tokenizers.insert("speech".into(), json!("speech.safetensors"));
    m.write(dir)?;
    Ok(())
}

#[test]
fn decode_writes_png_and_wav_that_open() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("corpus");
    ingest_sample_doc(&dir)?;
    let out = tmp.path().join("decoded");
    let v: Value =
        serde_json::from_str(&ok(&["shards", "decode", s(&dir), "--doc", "0", "--out", s(&out), "--json"])?)?;
    assert_eq!(v["missing_decoders"], json!({}), "{v}");

    let text = std::fs::read_to_string(out.join("000-text.txt"))?;
    assert_eq!(text, "The number 7 written by hand:");
    let img = image::open(out.join("001-image.png"))?;
    assert_eq!((img.width(), img.height()), (32, 32));
    let wav = hound::WavReader::open(out.join("003-speech.wav"))?;
    let spec = wav.spec();
    assert_eq!(spec.channels, 1);
    assert!(spec.sample_rate >= 8000, "{spec:?}");
    assert!(wav.duration() > spec.sample_rate / 10, "at least a tenth of a second: {}", wav.duration());
    let spectrogram = image::open(out.join("003-speech.spectrogram.png"))?;
    assert!(spectrogram.width() > 1 && spectrogram.height() > 1);

    // Without the decoders, the ids are written and the output says so.
    std::fs::remove_file(dir.join("image.safetensors"))?;
    let out2 = tmp.path().join("decoded2");
    let v: Value =
        serde_json::from_str(&ok(&["shards", "decode", s(&dir), "--doc", "0", "--out", s(&out2), "--json"])?)?;
    assert!(v["missing_decoders"]["image"].as_str().is_some_and(|w| w.contains("missing")), "{v}");
    let ids = std::fs::read_to_string(out2.join("001-image.ids.txt"))?;
    assert_eq!(ids.split_whitespace().count(), 64);
    assert!(out2.join("003-speech.wav").is_file());
    Ok(())
}

#[test]
fn closed_stdout_pipe_exits_zero() -> TestResult {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("corpus");
    let mut w = CorpusWriter::create(&dir, &fixture_vocab(), WriterProperties::default(), "pipe")?;
    let doc = Document::new(vec![Segment::tokens(Modality::Text, (0..40).map(|i| 1 + i % 11).collect())]);
    for _ in 0..4000 {
        w.add_document(&doc)?;
    }
    w.finish_with_manifest()?;
    // Far more output than a pipe buffer holds: the writer must hit the closed pipe.
    let mut child = Command::new(env!("CARGO_BIN_EXE_motley"))
        .args(["shards", "head", s(&dir), "-n", "4000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut first = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut first)?;
    }
    let status = child.wait()?;
    assert!(first.starts_with("── doc 0"), "{first}");
    assert!(status.success(), "head into a closed pipe: {status}");
    Ok(())
}

/// Writes a large synthetic corpus for measuring (not run by default):
/// `MOTLEY_BIG_CORPUS=/tmp/big MOTLEY_BIG_DOCS=10000000 cargo test -p motley-tools --release
/// --test shards_cli -- --ignored write_big_corpus`.
#[test]
#[ignore = "writes a large corpus for manual measurements"]
fn write_big_corpus() -> TestResult {
    let Some(dir) = std::env::var_os("MOTLEY_BIG_CORPUS") else { anyhow::bail!("set MOTLEY_BIG_CORPUS") };
    let n: u64 = std::env::var("MOTLEY_BIG_DOCS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000);
    let mut w = CorpusWriter::create(PathBuf::from(dir), &fixture_vocab(), WriterProperties::default(), "big")?;
    let mut r = Lcg(1);
    for d in 0..n {
        let mut segs = vec![Segment::tokens(Modality::Text, (0..1 + r.next(16)).map(|_| 1 + r.next(11)).collect())];
        if d % 10 == 0 {
            segs.push(Segment::tokens(Modality::Image, (0..16).map(|_| r.next(16)).collect()));
        }
        w.add_document(&Document::new(segs))?;
    }
    let m = w.finish_with_manifest()?;
    eprintln!("{} documents in {} shards, {} bytes", m.num_docs, m.shards.len(), m.bytes);
    Ok(())
}

#[test]
fn decode_latent_image_through_the_patch_inverse() -> TestResult {
    use motley_tokenizers::{ImageTokenizer, LatentImageTokenizer};
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("corpus");
    let latent = LatentImageTokenizer::raw(32, 4)?;
    let dim = latent.latent_dim().unwrap_or(0);
    let seg = latent.encode_file(&sample().join("images/00007.png"))?;
    let vocab = Vocab::build(WORDS.len() as u32, 0, 8, Some(dim));
    let mut w = CorpusWriter::create(&dir, &vocab, WriterProperties::default(), "latent")?;
    w.add_document(&Document::new(vec![Segment::tokens(Modality::Text, vec![1, 2, 3]), seg]))?;
    let mut m = w.finish_with_manifest()?;
    ImageTokenizer::save(&latent, &dir.join("latent.safetensors"))?;
    std::fs::write(dir.join("text.json"), wordlevel_json())?;
    m.tokenizers.insert("image".into(), json!("latent.safetensors"));
    m.tokenizers.insert("text".into(), json!("text.json"));
    m.write(&dir)?;

    let head = ok(&["shards", "head", s(&dir)])?;
    assert!(head.contains(&format!("image latent 64×{dim}, grid 8×8")), "{head}");
    let out = tmp.path().join("decoded");
    ok(&["shards", "decode", s(&dir), "--doc", "0", "--out", s(&out)])?;
    assert_eq!(std::fs::read_to_string(out.join("000-text.txt"))?, "the digit seven");
    let img = image::open(out.join("001-image.png"))?.to_luma8();
    assert_eq!(img.dimensions(), (32, 32));
    let original = image::open(sample().join("images/00007.png"))?.to_luma8();
    let max_err = img.pixels().zip(original.pixels()).map(|(a, b)| a.0[0].abs_diff(b.0[0])).max().unwrap_or(255);
    assert!(max_err <= 8, "raw latent patches invert to the original image (max error {max_err})");
    // The parquet export leaves ids null for latent segments.
    let pq = tmp.path().join("x.parquet");
    let v: Value = serde_json::from_str(&ok(&["shards", "export-parquet", s(&dir), "--out", s(&pq), "--json"])?)?;
    assert_eq!(v["rows"], json!(2));
    assert_eq!(v["ids"], json!(3));
    Ok(())
}

/// The hostile corpora of motley-shards' tests and where a reader must report each problem.
#[path = "../../shards/tests/hostile/generate.rs"]
mod hostile;

#[test]
fn hostile_shards_fail_verify_head_and_stats_naming_shard_document_and_offset() -> TestResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shards/tests/hostile");
    for c in hostile::cases() {
        let dir = root.join(c.name);
        let d = s(&dir);
        let run = |args: &[&str]| -> anyhow::Result<(String, String)> {
            let o = motley(args)?;
            // 1 is a reported error; a panic would exit with 101.
            anyhow::ensure!(o.status.code() == Some(1), "{}: motley {args:?} exited with {}", c.name, o.status);
            Ok((stdout(&o), String::from_utf8_lossy(&o.stderr).into_owned()))
        };
        let (json, _) = run(&["shards", "verify", d, "--json"])?;
        let v: Value = serde_json::from_str(&json)?;
        let problems = v["problems"].as_array().cloned().unwrap_or_default();
        let (human, _) = run(&["shards", "verify", d])?;
        let (_, head_err) = run(&["shards", "head", d, "-n", "3"])?;
        let (_, stats_err) = run(&["shards", "stats", d, "--deep"])?;
        let has = |p: &Value, shard: Option<&str>, doc: Option<u64>, offset: u64, needle: &str| {
            p["shard"].as_str() == shard
                && p["doc"].as_u64() == doc
                && p["offset"].as_u64() == Some(offset)
                && p["message"].as_str().is_some_and(|m| m.contains(needle))
        };
        match c.expect {
            hostile::Expect::Doc { doc, offset, needle, .. } => {
                let shard = Some(c.shard.as_str());
                assert!(problems.iter().any(|p| has(p, shard, Some(doc), offset, needle)), "{}: {v:#}", c.name);
                assert!(human.contains(&format!("{} @ {offset} [corrupt]", c.shard)), "{}: {human}", c.name);
                for err in [&head_err, &stats_err] {
                    for want in [c.shard.as_str(), &format!("document {doc}"), &format!("byte {offset}"), needle] {
                        assert!(err.contains(want), "{}: {err:?} does not say {want:?}", c.name);
                    }
                }
            }
            hostile::Expect::Vocab { offset, needle } => {
                let manifest = problems
                    .iter()
                    .any(|p| p["kind"] == json!("manifest") && p["message"].to_string().contains(needle));
                assert!(manifest, "{}: {v:#}", c.name);
                assert!(
                    problems.iter().any(|p| has(p, Some(c.shard.as_str()), None, offset, needle)),
                    "{}: {v:#}",
                    c.name
                );
                for err in [&head_err, &stats_err] {
                    assert!(err.contains("manifest.json") && err.contains(needle), "{}: {err}", c.name);
                }
            }
            hostile::Expect::Open { offset, needle } => {
                assert!(
                    problems.iter().any(|p| has(p, Some(c.shard.as_str()), None, offset, needle)),
                    "{}: {v:#}",
                    c.name
                );
                for err in [&head_err, &stats_err] {
                    assert!(err.contains(c.shard.as_str()) && err.contains(needle), "{}: {err}", c.name);
                }
            }
        }
    }
    Ok(())
}
