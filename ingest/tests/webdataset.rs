//! WebDataset tars as ingest input: the same samples as a tar, a gzipped tar and as JSONL with
//! files give the same documents (image and speech sources, captions first), and a tar that breaks off keeps
//! every sample before the break and reports the break with its byte offset.

mod common;

use std::path::{Path, PathBuf};

use motley_ingest::{ingest, read_errors};
use motley_shards::Document;

/// The first `n` records of a sample-corpus JSONL (`media_key`, `text_key`): as a JSONL with
/// absolute paths, and as a WebDataset tar (`{key}.{ext}` + `{key}.txt`, in the same order).
fn both_layouts(
    jsonl: &str,
    media_key: &str,
    text_key: &str,
    n: usize,
    dir: &Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let sample = common::repo().join("data/sample");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(sample.join(jsonl))?
        .lines()
        .take(n)
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let mut out_jsonl = String::new();
    let mut tar = tar::Builder::new(Vec::new());
    for (i, v) in lines.iter().enumerate() {
        let media = sample.join(v[media_key].as_str().unwrap_or_default());
        let text = v[text_key].as_str().unwrap_or_default();
        out_jsonl.push_str(&serde_json::json!({media_key: media, text_key: text}).to_string());
        out_jsonl.push('\n');
        let ext = media.extension().and_then(|e| e.to_str()).unwrap_or_default();
        for (name, data) in
            [(format!("s/{i:06}.{ext}"), std::fs::read(&media)?), (format!("s/{i:06}.txt"), text.as_bytes().to_vec())]
        {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, data.as_slice())?;
        }
    }
    let (j, t) = (dir.join("records.jsonl"), dir.join("shard-000000.tar"));
    std::fs::write(&j, out_jsonl)?;
    std::fs::write(&t, tar.into_inner()?)?;
    Ok((j, t))
}

fn tokens(docs: &[Document]) -> Vec<Vec<(motley_shards::Modality, motley_shards::SegmentData)>> {
    docs.iter().map(|d| d.segments.iter().map(|s| (s.modality, s.data.clone())).collect()).collect()
}

#[test]
fn a_tar_gives_the_documents_of_the_same_samples_as_files() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    for (kind, jsonl, media_key, text_key, extra) in [
        ("image", "images.jsonl", "image", "caption", "[options]\nimage_mode = \"vq\"\n"),
        ("speech", "speech.jsonl", "audio", "transcript", ""),
    ] {
        let dir = tmp.path().join(kind);
        std::fs::create_dir_all(&dir)?;
        let (j, t) = both_layouts(jsonl, media_key, text_key, 12, &dir)?;
        let run = |path: &Path, fields: &str, out: &str| -> anyhow::Result<Vec<Document>> {
            let r = common::recipe(
                &format!(
                    "{extra}[[source]]\nkind = \"{kind}\"\npaths = [{:?}]\ntext_first = 1.0\n{fields}",
                    path.display()
                ),
                &dir,
            );
            let out = dir.join(out);
            let s = ingest(&common::config(r, &out))?;
            assert_eq!((s.records, s.documents), (12, 12), "{kind} {out:?}");
            Ok(common::documents(&out))
        };
        let from_files = run(&j, &format!("text_field = {text_key:?}\n{media_key}_field = {media_key:?}\n"), "files")?;
        let from_tar = run(&t, "", "tar")?;
        assert_eq!(tokens(&from_tar), tokens(&from_files), "{kind}");
        // The same tar gzipped (`.tar.gz`, read through a decompressor).
        let gz = dir.join("shard-000000.tar.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &std::fs::read(&t)?)?;
        std::fs::write(&gz, enc.finish()?)?;
        assert_eq!(tokens(&run(&gz, "", "tar.gz")?), tokens(&from_files), "{kind} .tar.gz");
        let source = from_tar[3].segments[1].meta.source.as_deref().unwrap_or_default();
        assert!(source.starts_with("s/000003."), "{kind}: {source}");
    }
    Ok(())
}

/// Ingests the image tar `path` (VQ codes) into `out`.
fn ingest_images(path: &Path, out: &Path) -> anyhow::Result<motley_ingest::Summary> {
    let toml =
        format!("[options]\nimage_mode = \"vq\"\n[[source]]\nkind = \"image\"\npaths = [{:?}]\n", path.display());
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(ingest(&common::config(common::recipe(&toml, base), out))?)
}

#[test]
fn a_broken_tar_keeps_the_samples_before_it_and_reports_the_offset() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (_, t) = both_layouts("images.jsonl", "image", "caption", 10, tmp.path())?;
    let bytes = std::fs::read(&t)?;
    // Cut in the middle of the archive: the member there breaks off.
    std::fs::write(&t, &bytes[..bytes.len() / 2])?;
    let out = tmp.path().join("corpus");
    let s = ingest_images(&t, &out)?;
    assert!(s.documents >= 3 && s.documents < 10, "{} documents", s.documents);
    let errors = read_errors(&out)?;
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = &errors[0];
    assert_eq!(e.reason, motley_ingest::Reason::Io);
    assert_eq!(e.record, Some(s.documents));
    let offset = e.byte_offset.unwrap_or(u64::MAX);
    assert!(offset.is_multiple_of(512) && offset < bytes.len() as u64 / 2, "{e:?}");
    assert!(e.file.ends_with("shard-000000.tar") && e.error.contains("breaks off"), "{e:?}");

    // A gzipped tar cut short: the samples decompressed before the cut are kept.
    let gz = tmp.path().join("cut.tar.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, &bytes)?;
    let zipped = enc.finish()?;
    std::fs::write(&gz, &zipped[..zipped.len() / 2])?;
    let out = tmp.path().join("corpus-gz");
    let s = ingest_images(&gz, &out)?;
    assert!(s.documents >= 1 && s.documents < 10, "{} documents", s.documents);
    let errors = read_errors(&out)?;
    assert_eq!((errors.len(), errors[0].reason), (1, motley_ingest::Reason::Io), "{errors:?}");
    Ok(())
}
