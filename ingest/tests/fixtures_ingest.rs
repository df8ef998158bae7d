//! Parquet fixtures (nulls, large binary, dictionary strings, HF image structs) and the
//! bad-input set ingest with every valid record kept and every bad one reported.

mod common;

use motley_ingest::{Error, Reason, ingest, read_errors};
use motley_shards::{Modality, SegmentData};

#[test]
fn parquet_text_with_nulls_and_dictionary_strings() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("corpus");
    // task_mib tiny: the file is split into several row-group tasks.
    let r = common::recipe(
        "[options]\ntask_mib = 0.001\n[[source]]\nkind = \"text\"\npaths = [\"parquet/text.parquet\"]\ntext_column = \"text\"\n",
        &common::fixtures(),
    );
    let s = ingest(&common::config(r, &out))?;
    assert!(s.tasks > 1, "row groups split into tasks: {}", s.tasks);
    assert_eq!(s.records, 40);
    assert_eq!(s.documents, 33, "40 rows - 6 nulls - 1 empty");
    assert_eq!(s.errors_by_reason.get("missing_field"), Some(&6));
    assert_eq!(s.errors_by_reason.get("empty"), Some(&1));
    let errors = read_errors(&out)?;
    let rows: Vec<u64> = errors.iter().filter_map(|e| e.record).collect();
    assert_eq!(rows, vec![3, 10, 11, 17, 24, 31, 38], "errors in file order with file-global row numbers");
    // Texts decode back in row order.
    let text = motley_tokenizers::load_text(common::tokenizers_dir().join("text.json"))?;
    let docs = common::documents(&out);
    let SegmentData::Tokens(ids) = &docs[0].segments[0].data else { anyhow::bail!("text tokens expected") };
    assert_eq!(text.decode(ids)?, "alpha beta gamma number 0");
    let SegmentData::Tokens(ids) = &docs[3].segments[0].data else { anyhow::bail!("text tokens expected") };
    assert_eq!(text.decode(ids)?, "alpha beta gamma number 4", "row 3 (null) is skipped");
    Ok(())
}

#[test]
fn parquet_images_from_hf_structs_and_large_binary() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("corpus");
    let r = common::recipe(
        "[options]\nimage_mode = \"vq\"\n[[source]]\nname = \"hf\"\nkind = \"image\"\npaths = [\"parquet/images.parquet\"]\ncaption_field = \"caption\"\ntext_first = 1.0\n\
         [[source]]\nname = \"raw\"\nkind = \"image\"\npaths = [\"parquet/images.parquet\"]\nimage_column = \"png\"\ntext_first = 0.0\n",
        &common::fixtures(),
    );
    let s = ingest(&common::config(r, &out))?;
    assert_eq!(s.documents, 9 + 10, "one null image skipped in the struct column");
    assert_eq!(s.errors_by_reason.get("missing_field"), Some(&1));
    let docs = common::documents(&out);
    // Row 0: caption then image (text_first = 1); row 2 has a null caption: image only.
    assert_eq!(docs[0].segments.iter().map(|s| s.modality).collect::<Vec<_>>(), vec![Modality::Text, Modality::Image]);
    assert_eq!(docs[2].segments.iter().map(|s| s.modality).collect::<Vec<_>>(), vec![Modality::Image]);
    // Row 6 carries only a path (side.png, 12x12) and still becomes an image.
    assert_eq!(docs[5].segments.last().and_then(|s| s.meta.source.clone()).as_deref(), Some("side.png"));
    // Second source: image first (text_first = 0).
    assert_eq!(docs[9].segments.iter().map(|s| s.modality).collect::<Vec<_>>(), vec![Modality::Image, Modality::Text]);
    assert_eq!(docs[9].segments[0].meta.source.as_deref(), Some("images.parquet#0"));
    Ok(())
}

#[test]
fn bad_inputs_are_reported_and_valid_records_kept() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("corpus");
    let r = common::recipe(
        "[[source]]\nkind = \"image\"\npaths = [\"bad/images.jsonl\"]\n\
         [[source]]\nkind = \"speech\"\npaths = [\"bad/speech.jsonl\"]\n\
         [[source]]\nkind = \"text\"\npaths = [\"bad/text\"]\n",
        &common::fixtures(),
    );
    let s = ingest(&common::config(r.clone(), &out))?;
    assert_eq!(s.documents, 2 + 2 + 2, "two good images, two good clips, two good text files");
    let errors = read_errors(&out)?;
    let got: Vec<(String, Option<u64>, Reason)> = errors
        .iter()
        .map(|e| {
            (
                std::path::Path::new(&e.file).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                e.record,
                e.reason,
            )
        })
        .collect();
    let want = vec![
        ("images.jsonl".to_string(), Some(1), Reason::Image),
        ("images.jsonl".to_string(), Some(2), Reason::Image),
        ("images.jsonl".to_string(), Some(3), Reason::Image),
        ("images.jsonl".to_string(), Some(4), Reason::MissingFile),
        ("speech.jsonl".to_string(), Some(1), Reason::Audio),
        ("empty.txt".to_string(), Some(0), Reason::Empty),
        ("latin1.txt".to_string(), Some(0), Reason::InvalidUtf8),
    ];
    assert_eq!(got, want, "{errors:#?}");
    assert!(errors.iter().all(|e| !e.error.is_empty()));
    assert_eq!(s.errors, 7);

    // --max-errors: stops with a clear error, and errors.jsonl still lists what was seen.
    let out2 = tmp.path().join("capped");
    let mut cfg = common::config(r, &out2);
    cfg.max_errors = Some(2);
    cfg.workers = Some(1);
    match ingest(&cfg) {
        Err(Error::TooManyErrors { errors, max: 2, .. }) => assert!(errors > 2),
        other => anyhow::bail!("expected TooManyErrors, got {other:?}"),
    }
    assert!(read_errors(&out2)?.len() >= 3);
    assert!(!out2.join("manifest.json").exists(), "an incomplete corpus gets no manifest");
    Ok(())
}
