//! Planted corruption of every kind is reported as a typed error naming the shard, the byte
//! offset and (for checksums) expected vs actual; `verify()` lists it; nothing panics.

mod common;

use std::path::{Path, PathBuf};

use motley_shards::{Compression, Corpus, Manifest, ShardError, ShardReader, ShardWriter, WriterProperties};

fn setup(compression: Compression) -> anyhow::Result<(tempfile::TempDir, Manifest)> {
    let dir = tempfile::tempdir()?;
    let m = common::write_corpus(dir.path(), 60, compression, 8 << 10)?;
    assert!(m.shards.len() >= 2);
    Ok((dir, m))
}

fn flip(path: &Path, offset: u64) -> anyhow::Result<()> {
    let mut b = std::fs::read(path)?;
    b[offset as usize] ^= 0x10;
    std::fs::write(path, b)?;
    Ok(())
}

/// Reads every document; returns the first error.
fn read_all(dir: &Path) -> anyhow::Result<Option<ShardError>> {
    let c = Corpus::open(dir)?;
    for d in 0..c.num_docs() {
        if let Err(e) = c.get(d) {
            return Ok(Some(e));
        }
    }
    Ok(None)
}

fn shard_path(dir: &Path, m: &Manifest, i: usize) -> PathBuf {
    dir.join(&m.shards[i].name)
}

#[test]
fn bit_flip_in_a_chunk_names_shard_offset_and_checksums() -> anyhow::Result<()> {
    for compression in [Compression::Raw, Compression::Zstd] {
        let (dir, m) = setup(compression)?;
        let path = shard_path(dir.path(), &m, 1);
        let chunk = ShardReader::open(&path)?.chunk_entry(0)?;
        flip(&path, chunk.file_offset + 3)?;
        match read_all(dir.path())? {
            Some(ShardError::Checksum { path: p, what, offset, expected, actual }) => {
                assert_eq!(p, path);
                assert_eq!(what, "chunk");
                assert_eq!(offset, chunk.file_offset);
                assert_ne!(expected, actual);
                assert!(expected.starts_with("crc32c:"));
            }
            other => panic!("expected a chunk checksum error, got {other:?}"),
        }
        let report = Corpus::open(dir.path())?.verify();
        assert!(!report.is_ok());
        let kinds: Vec<&str> = report.problems.iter().map(|p| p.kind.as_str()).collect();
        assert!(kinds.contains(&"checksum"), "{:?}", report.problems);
        assert!(report.problems.iter().any(|p| p.message.contains("blake3")), "{:?}", report.problems);
        assert!(report.problems.iter().all(|p| p.shard.as_deref() == Some(m.shards[1].name.as_str())));
        assert!(report.problems.iter().any(|p| p.offset == Some(chunk.file_offset)));
    }
    Ok(())
}

#[test]
fn bit_flips_in_header_index_and_footer() -> anyhow::Result<()> {
    let (dir, m) = setup(Compression::Raw)?;
    let path = shard_path(dir.path(), &m, 0);
    let r = ShardReader::open(&path)?;
    let (index_at, len) = (r.footer().doc_index_offset, r.len_bytes());
    drop(r);
    let original = std::fs::read(&path)?;
    for (at, what) in [(5u64, "header"), (index_at + 1, "index"), (len - 100, "footer")] {
        std::fs::write(&path, &original)?;
        flip(&path, at)?;
        match read_all(dir.path())? {
            Some(ShardError::Checksum { path: p, what: w, .. }) => {
                assert_eq!(p, path);
                assert_eq!(w, what);
            }
            Some(ShardError::Corrupt { path: p, .. }) if what == "header" => assert_eq!(p, path),
            other => panic!("{what}: expected a checksum error, got {other:?}"),
        }
        assert!(!Corpus::open(dir.path())?.verify().is_ok());
    }
    Ok(())
}

#[test]
fn truncation_is_reported() -> anyhow::Result<()> {
    let (dir, m) = setup(Compression::Raw)?;
    let path = shard_path(dir.path(), &m, 0);
    let b = std::fs::read(&path)?;
    for keep in [b.len() - 1, b.len() / 2, 100, 10, 0] {
        std::fs::write(&path, &b[..keep])?;
        let err = read_all(dir.path())?;
        match &err {
            Some(ShardError::Corrupt { path: p, .. } | ShardError::Truncated { path: p, .. }) => assert_eq!(p, &path),
            other => panic!("truncated to {keep}: got {other:?}"),
        }
        let report = Corpus::open(dir.path())?.verify();
        assert!(report.problems.iter().any(|p| p.shard.as_deref() == Some(m.shards[0].name.as_str())));
    }
    Ok(())
}

#[test]
fn missing_shard_is_reported() -> anyhow::Result<()> {
    let (dir, m) = setup(Compression::Raw)?;
    let path = shard_path(dir.path(), &m, 1);
    std::fs::remove_file(&path)?;
    match read_all(dir.path())? {
        Some(ShardError::MissingShard { path: p }) => assert_eq!(p, path),
        other => panic!("got {other:?}"),
    }
    let report = Corpus::open(dir.path())?.verify();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].kind, "missing_shard");
    Ok(())
}

#[test]
fn manifest_disagreeing_with_shards() -> anyhow::Result<()> {
    let (dir, m) = setup(Compression::Raw)?;
    // A shard replaced by another one: counts differ from the manifest entry.
    let a = shard_path(dir.path(), &m, 0);
    let b = shard_path(dir.path(), &m, 1);
    std::fs::copy(&b, &a)?;
    match read_all(dir.path())? {
        Some(ShardError::ManifestMismatch { path, field, .. }) => {
            assert_eq!(path, a);
            assert!(["bytes", "num_docs", "num_chunks", "payload_bytes", "modalities"].contains(&field), "{field}");
        }
        other => panic!("got {other:?}"),
    }
    assert!(Corpus::open(dir.path())?.verify().problems.iter().any(|p| p.kind == "manifest_mismatch"));

    // Totals that do not add up: the manifest itself is rejected.
    let (dir, mut m) = setup(Compression::Raw)?;
    m.num_docs += 1;
    m.write(dir.path())?;
    assert!(matches!(Corpus::open(dir.path()), Err(ShardError::Manifest { .. })));

    // A wrong blake3 in the manifest: only the deep verify sees it.
    let (dir, mut m) = setup(Compression::Raw)?;
    m.shards[0].blake3 = "00".repeat(32);
    m.write(dir.path())?;
    assert!(read_all(dir.path())?.is_none());
    let report = Corpus::open(dir.path())?.verify();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].kind, "checksum");
    assert_eq!(report.problems[0].offset, Some(0));

    // A different vocabulary in the manifest than in the shards.
    let (dir, mut m) = setup(Compression::Raw)?;
    m.vocab = motley_shards::Vocab::build(1000, 256, 70_000, Some(8));
    m.write(dir.path())?;
    assert!(matches!(read_all(dir.path())?, Some(ShardError::ManifestMismatch { field: "vocab", .. })));
    Ok(())
}

#[test]
fn unfinished_shard_is_never_visible() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("x.mshard");
    let mut w = ShardWriter::create(&path, &common::vocab(), WriterProperties::default())?;
    w.add_document(&common::doc(1))?;
    assert!(!path.exists());
    drop(w); // abandoned: the temporary file is removed
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);

    // A crash (no destructor) leaves only the .tmp file; assembling the manifest refuses it.
    let mut w = ShardWriter::create(&path, &common::vocab(), WriterProperties::default())?;
    w.add_document(&common::doc(2))?;
    std::mem::forget(w);
    assert!(!path.exists());
    let err = Manifest::assemble(dir.path(), &["x.mshard"], &common::vocab());
    assert!(matches!(err, Err(ShardError::MissingShard { .. })), "{err:?}");
    let tmp = dir.path().join("x.mshard.tmp");
    assert!(ShardReader::open(&tmp).is_err(), "a partial shard does not parse");
    Ok(())
}

#[test]
fn assemble_reads_footers_in_the_given_order() -> anyhow::Result<()> {
    let (dir, m) = setup(Compression::Zstd)?;
    let mut names: Vec<String> = m.shards.iter().map(|s| s.name.clone()).collect();
    let again = Manifest::assemble(dir.path(), &names, &common::vocab())?;
    assert_eq!(again, m);
    names.reverse();
    let rev = Manifest::assemble(dir.path(), &names, &common::vocab())?;
    assert_eq!(rev.num_docs, m.num_docs);
    assert_eq!(rev.shards[0], *m.shards.last().ok_or_else(|| anyhow::anyhow!("no shards"))?);
    let wrong_vocab = motley_shards::Vocab::build(10, 10, 10, None);
    assert!(matches!(
        Manifest::assemble(dir.path(), &names, &wrong_vocab),
        Err(ShardError::ManifestMismatch { field: "vocab", .. })
    ));
    Ok(())
}

#[test]
fn corpus_writer_removes_crash_leftovers_of_its_prefix() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("task-00017-000.mshard.tmp"), b"partial")?;
    std::fs::write(dir.path().join("task-00018-000.mshard.tmp"), b"other task")?;
    let w =
        motley_shards::CorpusWriter::create(dir.path(), &common::vocab(), WriterProperties::default(), "task-00017")?;
    assert!(!dir.path().join("task-00017-000.mshard.tmp").exists());
    assert!(dir.path().join("task-00018-000.mshard.tmp").exists());
    assert!(w.finish()?.is_empty());
    Ok(())
}
