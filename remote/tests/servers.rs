//! Remote corpora against real servers started here on 127.0.0.1 (installed by scripts/setup
//! into .test-servers): moto's S3 server and RangeHTTPServer. Upload then read back gives the
//! local corpus's exact batches through a bounded cache; a corrupted object is rejected by its
//! checksum; a server stopped mid-run fails with the object named after retries, one back
//! within the retries is no error; an upload cut short leaves no manifest; plain HTTP works
//! through range reads, and a server without Range support is an error; a file past 64 MiB
//! streams up as a multipart upload.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{create_bucket, moto, start, start_on};

use motley_remote::RemoteOptions;
use motley_shards::{
    Batch, Compression, Corpus, CorpusWriter, Document, Loader, LoaderConfig, Modality, RowIndexMode, Segment, Source,
    Vocab, WriterProperties,
};

fn s3_opts(port: u16, cache: &Path) -> RemoteOptions {
    RemoteOptions {
        cache_dir: Some(cache.to_path_buf()),
        retries: 2,
        backoff: Duration::from_millis(10),
        range_bytes: 16 << 10,
        ..common::s3_options(port)
    }
}

fn doc(i: u64) -> Document {
    let n = 20 + (i * 37 % 300) as u32;
    Document::new(vec![Segment::tokens(Modality::Text, (0..n).map(|k| (k * 7 + i as u32) % 1000).collect())])
}

/// A zstd corpus of several shards.
fn write_corpus(dir: &Path) -> anyhow::Result<Arc<Corpus>> {
    let props =
        WriterProperties::builder().compression(Compression::Zstd).chunk_size(2 << 10).max_shard_bytes(6 << 10).build();
    let mut w = CorpusWriter::create(dir, &Vocab::build(1000, 0, 0, None), props, "part")?;
    for i in 0..600 {
        w.add_document(&doc(i))?;
    }
    w.finish_with_manifest()?;
    // Tokenizer files as ingest records them: a path string, and a pretrained model's object.
    std::fs::create_dir_all(dir.join("tokenizers"))?;
    std::fs::write(dir.join("tokenizers/text.json"), b"{}")?;
    std::fs::write(dir.join("tokenizers/image.safetensors"), b"vae weights")?;
    let mut m = motley_shards::Manifest::read(dir)?;
    m.tokenizers.insert("text".into(), serde_json::json!("tokenizers/text.json"));
    m.tokenizers
        .insert("image".into(), serde_json::json!({"file": "tokenizers/image.safetensors", "kind": "vq-model"}));
    m.write(dir)?;
    Ok(Arc::new(Corpus::open(dir)?))
}

fn batches(c: Arc<Corpus>, world_size: usize, index: &Path, n: usize) -> anyhow::Result<Vec<Batch>> {
    let cfg = LoaderConfig {
        seq_len: 128,
        batch_size: 4,
        prefetch: 0,
        world_size,
        shuffle_window: 64,
        row_index: if world_size > 1 { RowIndexMode::Always } else { RowIndexMode::Auto },
        index_dir: Some(index.to_path_buf()),
        // The decode-ahead thread pins the next window's shards at a time of its choosing:
        // without it the cache's contents at the end are deterministic.
        decode_ahead: false,
        ..Default::default()
    };
    let mut l = Loader::new(vec![Source::new(c, 1.0)], cfg)?;
    (0..n).map(|_| Ok(l.next_batch()?)).collect()
}

#[test]
fn s3_upload_then_train_order_equals_local_through_a_bounded_cache() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let local = write_corpus(&tmp.path().join("local"))?;
    assert!(local.num_shards() >= 6, "{} shards", local.num_shards());
    let server = moto()?;
    create_bucket(server.port, "bkt")?;
    let uri = "s3://bkt/corpora/c1";
    let limit = local.manifest().shards.iter().map(|s| s.bytes).max().unwrap_or(0) * 3;
    let opts = RemoteOptions { cache_limit: limit, ..s3_opts(server.port, &tmp.path().join("cache")) };
    let up = motley_remote::upload(local.dir(), uri, &opts, &|_| {})?;
    assert_eq!(up.shards, local.num_shards());

    // The first batch needs the manifest and the first window's shards, not the corpus.
    let unbounded = RemoteOptions { cache_limit: 0, cache_dir: Some(tmp.path().join("cache-first")), ..opts.clone() };
    let (first, first_store) = motley_remote::open_store(uri, &unbounded)?;
    batches(Arc::new(first), 1, &tmp.path().join("ix-first"), 1)?;
    let total = local.manifest().bytes;
    let first_bytes = first_store.cached_bytes();
    assert!(first_bytes < total / 4, "the first batch fetched {first_bytes} of the corpus's {total} bytes");
    // The tokenizer files travel with the corpus, a pretrained model's too.
    let (first, _) = motley_remote::open_store(uri, &unbounded)?;
    assert_eq!(std::fs::read(first.dir().join("tokenizers/image.safetensors"))?, b"vae weights");
    assert_eq!(std::fs::read(first.dir().join("tokenizers/text.json"))?, b"{}");

    let (remote, store) = motley_remote::open_store(uri, &opts)?;
    assert_eq!(remote.manifest(), local.manifest());
    // Two epochs through the loader: the same batches as from the local copy.
    let steps = 2 * 600 * 170 / (128 * 4) + 5;
    let want = batches(local.clone(), 1, &tmp.path().join("ix-local"), steps)?;
    let got = batches(Arc::new(remote), 1, &tmp.path().join("ix-remote"), steps)?;
    assert_eq!(got, want, "remote batches differ from the local corpus's");
    let max_shard = local.manifest().shards.iter().map(|s| s.bytes).max().unwrap_or(0);
    let held = store.cached_bytes();
    assert!(held <= limit + max_shard && held < total, "cache holds {held} bytes, limit {limit}, corpus {total}");
    // Through the row index on 3 ranks, too.
    let (remote, _) = motley_remote::open_store(uri, &opts)?;
    let want = batches(local.clone(), 3, &tmp.path().join("ix-local"), 20)?;
    assert_eq!(batches(Arc::new(remote), 3, &tmp.path().join("ix-remote"), 20)?, want);
    // verify through the store: every shard fetched, checked and let go.
    let (remote, _) = motley_remote::open_store(uri, &opts)?;
    let report = remote.verify();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.docs, 600);
    Ok(())
}

#[test]
fn a_corrupted_object_is_rejected_by_its_checksum() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let local = write_corpus(&tmp.path().join("local"))?;
    // Same manifest, one shard's bytes changed (same size): what a bad upload or a bit flip at
    // rest would leave in the bucket.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad)?;
    for e in std::fs::read_dir(local.dir())? {
        let p = e?.path();
        if p.is_file() {
            std::fs::copy(&p, bad.join(p.file_name().unwrap_or_default()))?;
        }
    }
    let victim = &local.manifest().shards[1].name;
    let mut bytes = std::fs::read(bad.join(victim))?;
    bytes[100] ^= 0x01;
    std::fs::write(bad.join(victim), &bytes)?;
    let server = moto()?;
    create_bucket(server.port, "bkt")?;
    let opts = s3_opts(server.port, &tmp.path().join("cache"));
    motley_remote::upload(&bad, "s3://bkt/bad", &opts, &|_| {})?;
    let remote = motley_remote::open("s3://bkt/bad", &opts)?;
    let doc = remote.shard_start(1).unwrap_or(0);
    let err = remote.get(doc).err().ok_or_else(|| anyhow::anyhow!("the corrupted shard was accepted"))?;
    assert_eq!(err.kind(), "checksum", "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("s3://bkt/bad/{victim}")), "{msg}");
    // Nothing of it was kept in the cache.
    assert!(!motley_remote::cache_dir_for("s3://bkt/bad", &opts).join(victim).exists());
    // The other shards are fine.
    assert!(remote.get(0).is_ok());
    Ok(())
}

#[test]
fn a_server_stopped_mid_run_fails_clearly_after_retries() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let local = write_corpus(&tmp.path().join("local"))?;
    let server = moto()?;
    create_bucket(server.port, "bkt")?;
    let opts = RemoteOptions { prefetch: 0, ..s3_opts(server.port, &tmp.path().join("cache")) };
    motley_remote::upload(local.dir(), "s3://bkt/c", &opts, &|_| {})?;
    let remote = Arc::new(motley_remote::open("s3://bkt/c", &opts)?);
    let cfg = LoaderConfig { seq_len: 128, batch_size: 4, prefetch: 0, shuffle_window: 64, ..Default::default() };
    let mut l = Loader::new(vec![Source::new(remote, 1.0)], cfg)?;
    l.next_batch()?; // the first shards arrive
    drop(server); // the server goes away mid-run
    let err = loop {
        match l.next_batch() {
            Ok(_) => continue, // shards already cached
            Err(e) => break e,
        }
    };
    let msg = err.to_string();
    assert_eq!(err.kind(), "remote", "{msg}");
    assert!(msg.contains("s3://bkt/c/part-") && msg.contains("attempt"), "{msg}");
    Ok(())
}

#[test]
fn plain_http_with_range_reads() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let local = write_corpus(&tmp.path().join("local"))?;
    let server = start(&["-m", "RangeHTTPServer", "--bind", "127.0.0.1", "{port}"], local.dir())?;
    let opts = RemoteOptions {
        cache_dir: Some(tmp.path().join("cache")),
        range_bytes: 4096,
        retries: 2,
        backoff: Duration::from_millis(10),
        ..RemoteOptions::default()
    };
    let uri = format!("http://127.0.0.1:{}/", server.port);
    let remote = motley_remote::open(&uri, &opts)?;
    for d in 0..local.num_docs() {
        assert_eq!(remote.get(d)?.to_owned(), local.get(d)?.to_owned(), "document {d}");
    }
    // Python's own http.server ignores Range (it sends the whole file): refused, not misread.
    let plain = start(&["-m", "http.server", "--bind", "127.0.0.1", "{port}"], local.dir())?;
    let opts = RemoteOptions { cache_dir: Some(tmp.path().join("cache2")), ..opts };
    let remote = motley_remote::open(&format!("http://127.0.0.1:{}", plain.port), &opts)?;
    let err = remote.get(0).err().ok_or_else(|| anyhow::anyhow!("a server without Range support was accepted"))?;
    assert!(err.to_string().contains("http://127.0.0.1"), "{err}");
    Ok(())
}

#[test]
fn an_interrupted_upload_leaves_no_manifest() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let local = write_corpus(&tmp.path().join("local"))?;
    // One shard cannot be read locally: the upload stops there, after the shards before it.
    let missing = &local.manifest().shards[3].name;
    std::fs::remove_file(local.dir().join(missing))?;
    let server = moto()?;
    create_bucket(server.port, "bkt")?;
    let opts = s3_opts(server.port, &tmp.path().join("cache"));
    let err = motley_remote::upload(local.dir(), "s3://bkt/half", &opts, &|_| {})
        .err()
        .ok_or_else(|| anyhow::anyhow!("an upload with a shard missing succeeded"))?;
    assert!(err.to_string().contains(missing.as_str()), "{err}");
    // A reader finds no corpus there (no manifest naming the shards that never arrived).
    let err = motley_remote::open("s3://bkt/half", &opts)
        .err()
        .ok_or_else(|| anyhow::anyhow!("a manifest was uploaded before its shards"))?;
    assert!(err.to_string().contains("s3://bkt/half/manifest.json"), "{err}");
    Ok(())
}

#[test]
fn a_server_back_within_the_retries_is_not_an_error() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let local = write_corpus(&tmp.path().join("local"))?;
    let args = ["-m", "RangeHTTPServer", "--bind", "127.0.0.1", "{port}"];
    let server = start(&args, local.dir())?;
    let port = server.port;
    let opts = RemoteOptions {
        cache_dir: Some(tmp.path().join("cache")),
        prefetch: 0,
        retries: 6,
        backoff: Duration::from_millis(100),
        ..RemoteOptions::default()
    };
    let remote = motley_remote::open(&format!("http://127.0.0.1:{port}/"), &opts)?;
    // The server goes away before any shard is fetched and is back ~0.5 s later: the fetches
    // in between fail (connection refused) and are retried with backoff until it answers.
    drop(server);
    let dir = local.dir().to_path_buf();
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        start_on(&args, &dir, port)
    });
    for d in 0..local.num_docs() {
        assert_eq!(remote.get(d)?.to_owned(), local.get(d)?.to_owned(), "document {d}");
    }
    let _server = back.join().map_err(|_| anyhow::anyhow!("restart thread panicked"))??;
    Ok(())
}

/// A file past the single-PUT limit goes up as a multipart upload streamed from disk and comes
/// back byte for byte; a file that cannot be read is an error naming it, and leaves no object.
#[test]
fn a_large_file_streams_up_in_parts_and_deletes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let server = moto()?;
    create_bucket(server.port, "bkt")?;
    let opts = RemoteOptions { range_bytes: 16 << 20, ..s3_opts(server.port, &tmp.path().join("cache")) };
    // 70 MiB of a pattern that shifts per part, so a part out of place would show.
    let big = tmp.path().join("big.bin");
    let bytes: Vec<u8> = (0..70u64 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&big, &bytes)?;
    motley_remote::put_file("s3://bkt/run/big.bin", &big, &opts)?;
    let listed = motley_remote::list_inputs("s3://bkt/run", &opts)?;
    assert_eq!(listed, vec![("s3://bkt/run/big.bin".to_string(), bytes.len() as u64)]);
    let back = tmp.path().join("back.bin");
    motley_remote::fetch_input("s3://bkt/run/big.bin", bytes.len() as u64, &back, &opts)?;
    assert!(std::fs::read(&back)? == bytes, "the object differs from the file");
    // Ranges one after another, and many small ones several at a time (arriving out of order,
    // each written at its offset): the same bytes.
    for (range_streams, range_bytes) in [(1, 16 << 20), (3, 1 << 20)] {
        let o = RemoteOptions { range_streams, range_bytes, ..opts.clone() };
        std::fs::remove_file(&back)?;
        motley_remote::fetch_input("s3://bkt/run/big.bin", bytes.len() as u64, &back, &o)?;
        assert!(std::fs::read(&back)? == bytes, "{range_streams} streams of {range_bytes} bytes: differs");
    }

    let err = motley_remote::put_file("s3://bkt/run/none.bin", &tmp.path().join("none.bin"), &opts)
        .err()
        .ok_or_else(|| anyhow::anyhow!("uploading a missing file succeeded"))?;
    assert!(err.to_string().contains("none.bin"), "{err}");
    motley_remote::delete_object("s3://bkt/run/big.bin", &opts)?;
    motley_remote::delete_object("s3://bkt/run/big.bin", &opts)?; // already gone: fine
    assert!(motley_remote::list_inputs("s3://bkt/run", &opts)?.is_empty());
    Ok(())
}
