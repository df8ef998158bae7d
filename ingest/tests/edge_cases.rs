//! Ingest edge cases: a second ingest into a busy `--out` refuses, a corpus's own
//! `tokenizers/` folder works as `--tokenizers`, the image formats of crawled data sets
//! (BMP, GIF, TIFF, lossy WebP) ingest, and mangled Parquet files (every codec and page
//! encoding motley reads) are errors naming the file, never a panic.

mod common;

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, LargeStringArray, RecordBatch, StringArray};
use motley_ingest::source::{ReadCtx, read_unit};
use motley_ingest::{Error, IngestConfig, Recipe, ingest, plan};
use parquet::arrow::ArrowWriter;
use parquet::basic::{BrotliLevel, Compression, Encoding, GzipLevel, ZstdLevel};
use parquet::file::properties::{WriterProperties, WriterVersion};
use rand::{Rng, SeedableRng};

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

/// A 300-row text table written by the parquet crate with `props`; `large` uses LargeUtf8.
fn text_parquet(props: WriterProperties, large: bool) -> anyhow::Result<Vec<u8>> {
    let texts: Vec<Option<String>> =
        (0..300).map(|i| (i % 7 != 0).then(|| format!("word{i} ").repeat(1 + i % 23))).collect();
    let text: ArrayRef =
        if large { Arc::new(LargeStringArray::from(texts)) } else { Arc::new(StringArray::from(texts)) };
    let batch =
        RecordBatch::try_from_iter([("text", text), ("n", Arc::new(Int64Array::from_iter_values(0..300)) as _)])?;
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    w.write(&batch)?;
    w.close()?;
    Ok(out)
}

/// Plans `dir/x.parquet` and reads every unit: the errors it yields (records read are dropped).
fn read_parquet_errors(recipe: &Recipe) -> Vec<motley_ingest::RecordError> {
    let mut errors = Vec::new();
    let tasks = match plan(recipe) {
        Ok(t) => t,
        Err(e) => {
            let file = recipe.sources[0].paths[0].clone();
            errors.push(motley_ingest::RecordError {
                file,
                record: None,
                byte_offset: None,
                reason: motley_ingest::Reason::Parquet,
                error: e.to_string(),
            });
            return errors;
        }
    };
    for t in &tasks {
        let ctx = ReadCtx { spec: &recipe.sources[t.source], options: &recipe.options };
        for u in &t.units {
            let _ = read_unit(&ctx, u, &mut |item| {
                if let Err(e) = item {
                    errors.push(e);
                }
                ControlFlow::Continue(())
            });
        }
    }
    errors
}

#[test]
fn mangled_parquet_is_an_error_never_a_panic() -> anyhow::Result<()> {
    let base = || WriterProperties::builder().set_max_row_group_row_count(Some(100)).set_data_page_row_count_limit(40);
    let mut inputs = vec![
        ("text.parquet", std::fs::read(common::fixtures().join("parquet/text.parquet"))?),
        ("images.parquet", std::fs::read(common::fixtures().join("parquet/images.parquet"))?),
        ("snappy.parquet", text_parquet(base().set_compression(Compression::SNAPPY).build(), false)?),
        ("zstd.parquet", text_parquet(base().set_compression(Compression::ZSTD(ZstdLevel::default())).build(), true)?),
        ("gzip.parquet", text_parquet(base().set_compression(Compression::GZIP(GzipLevel::default())).build(), false)?),
        (
            "brotli.parquet",
            text_parquet(base().set_compression(Compression::BROTLI(BrotliLevel::default())).build(), false)?,
        ),
    ];
    // Data pages v2, delta encodings, no dictionary, LZ4 (raw): the paths of newer writers.
    let v2 = base()
        .set_writer_version(WriterVersion::PARQUET_2_0)
        .set_compression(Compression::LZ4_RAW)
        .set_dictionary_enabled(false)
        .set_column_encoding("text".into(), Encoding::DELTA_BYTE_ARRAY)
        .set_column_encoding("n".into(), Encoding::DELTA_BINARY_PACKED)
        .build();
    inputs.push(("delta-v2.parquet", text_parquet(v2, false)?));
    let tmp = tempfile::tempdir()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    for (name, good) in &inputs {
        let kind = if name.starts_with("images") { "image\"\ntext_field = \"caption" } else { "text" };
        let recipe = common::recipe(&format!("[[source]]\nkind = \"{kind}\"\npaths = [\"x.parquet\"]\n"), tmp.path());
        let file = tmp.path().join("x.parquet");
        std::fs::write(&file, good)?;
        let clean = read_parquet_errors(&recipe);
        assert!(clean.iter().all(|e| e.reason != motley_ingest::Reason::Parquet), "{name}: {clean:?}");
        for k in 0..150 {
            let mut b = good.clone();
            // Bytes anywhere, or in the last 600 (page headers near the footer, the footer itself).
            let from = if k % 2 == 0 { 0 } else { b.len().saturating_sub(600) };
            match rng.random_range(0..3) {
                0 => {
                    for _ in 0..rng.random_range(1..5) {
                        let i = rng.random_range(from..b.len());
                        b[i] ^= 1 << rng.random_range(0..8);
                    }
                }
                1 => {
                    let i = rng.random_range(from..b.len());
                    b[i] = rng.random();
                }
                _ => b.truncate(rng.random_range(from..b.len())),
            }
            std::fs::write(&file, &b)?;
            for e in read_parquet_errors(&recipe) {
                assert!(e.file.contains("x.parquet"), "{name} mutant {k}: {e:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn parquet_files_that_panicked_the_decoder_are_file_errors_and_the_run_goes_on() -> anyhow::Result<()> {
    // Single-byte mutants the mutation probe found (see fixtures/parquet/corrupt/README.md):
    // parquet 60.1's arithmetic overflowed in a DELTA_BYTE_ARRAY page and in summing row counts.
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data)?;
    for f in ["delta_byte_array_prefix.parquet", "row_count_sum.parquet"] {
        std::fs::copy(common::fixtures().join("parquet/corrupt").join(f), data.join(f))?;
    }
    std::fs::copy(common::fixtures().join("parquet/text.parquet"), data.join("text.parquet"))?;
    let out = tmp.path().join("out");
    let recipe = common::recipe("[[source]]\nkind = \"text\"\npaths = [\"*.parquet\"]\n", &data);
    let summary = ingest(&common::config(recipe, &out))?;
    assert!(summary.documents > 0, "the good file's records are kept");
    let errors = std::fs::read_to_string(out.join("errors.jsonl"))?;
    let line_of = |f: &str| errors.lines().find(|l| l.contains(f) && l.contains("\"parquet\"")).map(str::to_string);
    // This page panics the decoder with or without overflow checks (in release: a slice index).
    let line = line_of("delta_byte_array_prefix.parquet").unwrap_or_else(|| panic!("{errors}"));
    assert!(line.contains("the Parquet decoder panicked") && line.contains("(at parquet-"), "{line}");
    if cfg!(debug_assertions) {
        // This footer's row-count sum only overflows with overflow checks on; release wraps and
        // reads the rows.
        let line = line_of("row_count_sum.parquet").unwrap_or_else(|| panic!("{errors}"));
        assert!(line.contains("the Parquet decoder panicked"), "{line}");
    }
    Ok(())
}
