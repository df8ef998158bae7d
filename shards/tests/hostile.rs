//! Shards someone else wrote: the hostile corpora under tests/hostile/ (laid out byte by byte
//! from docs/FORMAT.md by hostile/generate.rs, not by this crate's writer) are rejected by the
//! shard reader, the corpus reader, `verify` and the loader with an error naming the shard, the
//! document and the byte offset, and nothing panics (these tests run with overflow checks).
//! A legitimately extreme zstd shard, by contrast, is read.

mod common;
#[path = "hostile/generate.rs"]
mod generate;

use std::path::{Path, PathBuf};

use generate::Expect;
use motley_shards::{
    Compression, Corpus, Document, Loader, LoaderConfig, Modality, Segment, ShardError, ShardReader, ShardWriter,
    WriterProperties,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile")
}

fn loader_config() -> LoaderConfig {
    LoaderConfig { seq_len: 16, batch_size: 1, prefetch: 0, ..Default::default() }
}

#[test]
fn committed_corpora_match_their_generator() -> anyhow::Result<()> {
    let cases = generate::cases();
    assert!(cases.len() >= 10);
    for c in &cases {
        for (rel, bytes) in &c.files {
            let committed = std::fs::read(root().join(rel))?;
            assert!(
                &committed == bytes,
                "{rel} differs from its generator: cargo run -p motley-shards --example make_hostile_shards"
            );
        }
    }
    Ok(())
}

/// `e` is a record error naming `shard`, document `doc` (corpus id `global`), the offset and
/// `needle`, in its fields and in its message.
fn assert_doc_error(
    e: &ShardError,
    shard: &Path,
    (doc, global): (u64, Option<u64>),
    (offset, in_chunk): (u64, Option<u32>),
    needle: &str,
) {
    match e {
        ShardError::Record { path, doc: d, global: g, offset: o, in_chunk: c, .. } => {
            assert_eq!((path.as_path(), *d, *g, *o, *c), (shard, doc, global, offset, in_chunk), "{e}");
        }
        other => panic!("expected a record error for document {doc}, got {other:?}"),
    }
    let msg = e.to_string();
    let name = shard.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for want in [name.as_str(), &format!("document {doc}"), &format!("byte {offset}"), needle] {
        assert!(msg.contains(want), "{msg:?} does not say {want:?}");
    }
    assert_eq!(e.kind(), "corrupt");
    assert_eq!((e.offset(), e.doc()), (Some(offset), global));
}

/// Reads batches until the loader fails (it must, within a few batches of three documents).
fn loader_error(dir: &Path) -> anyhow::Result<ShardError> {
    let mut l = match Loader::from_dir(dir, loader_config()) {
        Ok(l) => l,
        Err(e) => return Ok(e),
    };
    for _ in 0..20 {
        if let Err(e) = l.next_batch() {
            return Ok(e);
        }
    }
    anyhow::bail!("the loader read {} without an error", dir.display())
}

#[test]
fn hostile_corpora_are_rejected_naming_shard_document_and_offset() -> anyhow::Result<()> {
    for c in generate::cases() {
        let dir = root().join(c.name);
        let shard = dir.join(&c.shard);
        match c.expect {
            Expect::Doc { doc, offset, in_chunk, needle } => {
                let r = ShardReader::open(&shard)?;
                let e = r.get(doc).err().ok_or_else(|| anyhow::anyhow!("{}: document {doc} read", c.name))?;
                assert_doc_error(&e, &shard, (doc, None), (offset, in_chunk), needle);
                // A second read fails the same way (the checks do not run only once).
                let again = r.get(doc).err().map(|e| e.to_string());
                assert_eq!(again, Some(e.to_string()), "{}", c.name);

                let corpus = Corpus::open(&dir)?;
                let e = corpus.get(doc).err().ok_or_else(|| anyhow::anyhow!("{}: corpus read", c.name))?;
                assert_doc_error(&e, &shard, (doc, Some(doc)), (offset, in_chunk), needle);
                for other in [0, 2] {
                    assert!(corpus.get(other).is_ok(), "{}: document {other} is sound", c.name);
                }

                let report = corpus.verify();
                let found = report.problems.iter().any(|p| {
                    p.shard.as_deref() == Some(c.shard.as_str())
                        && p.doc == Some(doc)
                        && p.offset == Some(offset)
                        && p.message.contains(needle)
                });
                assert!(found, "{}: verify did not report it: {:#?}", c.name, report.problems);

                let e = loader_error(&dir)?;
                assert_doc_error(&e, &shard, (doc, Some(doc)), (offset, in_chunk), needle);
            }
            Expect::Vocab { offset, needle } => {
                match Corpus::open(&dir) {
                    Err(ShardError::Manifest { detail, .. }) => assert!(detail.contains(needle), "{detail}"),
                    other => anyhow::bail!("{}: expected a manifest error, got {other:?}", c.name),
                }
                match ShardReader::open(&shard) {
                    Err(e @ ShardError::Corrupt { what: "meta", .. }) => {
                        assert_eq!((e.path(), e.offset()), (Some(shard.as_path()), Some(offset)));
                        assert!(e.to_string().contains(needle), "{e}");
                    }
                    other => anyhow::bail!("{}: expected a meta error, got {other:?}", c.name),
                }
                assert!(Loader::from_dir(&dir, loader_config()).is_err(), "{}", c.name);
            }
            Expect::Open { offset, needle } => {
                let e = ShardReader::open(&shard).err().ok_or_else(|| anyhow::anyhow!("{} opened", c.name))?;
                assert_eq!((e.path(), e.offset()), (Some(shard.as_path()), Some(offset)), "{e}");
                assert!(e.to_string().contains(needle), "{e}");
                let corpus = Corpus::open(&dir)?;
                let report = corpus.verify();
                assert!(
                    report.problems.iter().any(|p| p.offset == Some(offset) && p.message.contains(needle)),
                    "{}: {:#?}",
                    c.name,
                    report.problems
                );
                let e = loader_error(&dir)?;
                assert!(e.to_string().contains(needle), "{e}");
            }
        }
    }
    Ok(())
}

#[test]
fn a_zstd_chunk_compressed_past_4096_to_1_is_read() -> anyhow::Result<()> {
    // 2 MiB of zero ids: zstd stores it in a few hundred bytes. The format allows it, so the
    // reader must not refuse it with a ratio rule.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("zeros.mshard");
    let props = WriterProperties::builder().compression(Compression::Zstd).build();
    let mut w = ShardWriter::create(&path, &common::vocab(), props)?;
    let doc = Document::new(vec![Segment::tokens(Modality::Text, vec![0; 1 << 20])]);
    w.add_document(&doc)?;
    w.finish()?;
    let r = ShardReader::open(&path)?;
    let c = r.check_chunk(0)?;
    assert!(c.raw_len as u64 > 4096 * c.stored_len as u64 + 4096, "ratio {}", c.raw_len / c.stored_len);
    assert_eq!(r.get(0)?.to_owned(), doc);
    Ok(())
}
