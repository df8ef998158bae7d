//! Ingest edge cases: a second ingest into a busy `--out` refuses, a corpus's own
//! `tokenizers/` folder works as `--tokenizers`, and the image formats of crawled data sets
//! (BMP, GIF, TIFF, lossy WebP) ingest.

mod common;

use std::path::Path;

use motley_ingest::{Error, IngestConfig, Recipe, ingest};

fn text_recipe(data: &Path) -> Recipe {
    common::recipe("[[source]]\nkind = \"text\"\npaths = [\"*.txt\"]\n", data)
}

#[test]
fn a_second_ingest_into_a_busy_out_refuses() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("a.txt"), "one two three")?;
    let out = tmp.path().join("out");
    // Another ingest holds the output (taking the lock is its first step).
    let held = motley_ingest::lock_output(&out)?;
    match ingest(&common::config(text_recipe(&data), &out)) {
        Err(e @ Error::Locked { .. }) => assert!(e.to_string().contains("another `motley ingest`"), "{e}"),
        other => anyhow::bail!("expected Error::Locked, got {other:?}"),
    }
    let written: Vec<_> = std::fs::read_dir(&out)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    assert_eq!(written, [".ingest"], "the refused run wrote nothing");
    // Once the other run is done (lock released, here by dropping it) the same command runs,
    // and it also refuses a second lock while it holds its own.
    drop(held);
    let s = ingest(&common::config(text_recipe(&data), &out))?;
    assert_eq!(s.documents, 1);
    let again = motley_ingest::lock_output(&out)?;
    drop(again);
    // --overwrite keeps the lock file (removing it would let a concurrent run lock a new one).
    let mut cfg = common::config(text_recipe(&data), &out);
    cfg.overwrite = true;
    ingest(&cfg)?;
    assert!(out.join(".ingest").join(motley_ingest::LOCK_FILE).exists());
    Ok(())
}

#[test]
fn a_corpus_tokenizers_folder_is_accepted_as_tokenizers() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let recipe = || {
        common::recipe(
            "[[source]]\nkind = \"text\"\npaths = [\"text/devils_dictionary.txt\"]\n\
             [[source]]\nkind = \"interleaved\"\npaths = [\"interleaved.jsonl\"]\n",
            &common::repo().join("data/sample"),
        )
    };
    let first = tmp.path().join("first");
    let mut cfg = common::config(recipe(), &first);
    cfg.limit = Some(40);
    ingest(&cfg)?;
    // The second run gets nothing but the first corpus's tokenizers/ folder: text.json,
    // image.safetensors, speech.safetensors.
    let mut r = recipe();
    r.locate_tokenizers(&first.join(motley_ingest::TOKENIZERS_DIR));
    let second = tmp.path().join("second");
    let cfg2 = IngestConfig { recipe: r, out: second.clone(), ..cfg };
    ingest(&cfg2)?;
    let (a, b) = (motley_shards::Manifest::read(&first)?, motley_shards::Manifest::read(&second)?);
    assert_eq!(a.vocab, b.vocab);
    assert!(b.vocab.modalities.iter().all(|m| m.vocab_size > 0), "all three tokenizers found: {:?}", b.vocab);
    assert_eq!(common::documents(&first), common::documents(&second));
    Ok(())
}

#[test]
fn crawled_image_formats_ingest() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images)?;
    // Made from raw bytes (WebP by cwebp) by tokenizers/tests/fixtures/make_image_formats_fixture.py.
    let fixtures = common::repo().join("tokenizers/tests/fixtures");
    for name in ["formats.bmp", "formats.gif", "formats.tif", "formats.webp"] {
        std::fs::copy(fixtures.join(name), images.join(name))?;
    }
    std::fs::write(images.join("formats.txt"), "a red and blue picture")?;
    let r = common::recipe("[[source]]\nkind = \"image\"\npaths = [\"images\"]\n", tmp.path());
    let out = tmp.path().join("corpus");
    let s = ingest(&common::config(r, &out))?;
    assert_eq!((s.documents, s.errors), (4, 0), "{:?}", motley_ingest::read_errors(&out)?);
    let docs = common::documents(&out);
    let mut sources: Vec<String> = docs
        .iter()
        .flat_map(|d| d.segments.iter())
        .filter(|s| s.modality == motley_shards::Modality::Image)
        .filter_map(|s| s.meta.source.clone())
        .collect();
    sources.sort();
    assert_eq!(sources, ["formats.bmp", "formats.gif", "formats.tif", "formats.webp"]);
    Ok(())
}
