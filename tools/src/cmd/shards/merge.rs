//! `motley shards merge`: joins corpora (such as ingest's `--part i/N` outputs) into one after
//! checking that their vocabularies agree. Shards are hard-linked into the output (no payload
//! copy on one filesystem), copied when linking fails; the manifest is written last.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use motley_shards::{MANIFEST_NAME, Manifest, Modality, ShardStats};
use serde::Serialize;

use super::tokenizer_path;
use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Corpus directories to join, in order (document ids follow this order).
    #[arg(required = true, num_args = 1..)]
    dirs: Vec<PathBuf>,
    /// Output corpus directory (must not exist, or be empty), or an object-store location:
    /// merged locally, then uploaded, the manifest last.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Out {
    out: String,
    inputs: usize,
    documents: u64,
    shards: usize,
    bytes: u64,
    /// Shards placed by hard link (no payload copy).
    linked: usize,
    /// Shards copied (linking was impossible, e.g. across filesystems).
    copied: usize,
}

/// How a file got into the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    Linked,
    Copied,
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let remote = crate::remote::is_remote(&args.out).then(|| args.out.to_string_lossy().to_string());
    let local = match &remote {
        // Built locally first (hard links where possible), then uploaded, the manifest last.
        Some(uri) => {
            let d = crate::remote::staging_dir(uri, &ctx.remote);
            let _ = std::fs::remove_dir_all(&d);
            d
        }
        None => args.out.clone(),
    };
    let mut out = merge(&args.dirs, &local, &mut RealIo)?;
    if let Some(uri) = &remote {
        crate::remote::upload(&local, uri, &ctx.remote)
            .with_context(|| format!("uploading {} to {uri}", local.display()))?;
        out.out = uri.clone();
        let _ = std::fs::remove_dir_all(&local);
    }
    if ctx.json {
        return output::json(&out);
    }
    let mut w = std::io::stdout().lock();
    writeln!(
        w,
        "{}: {} documents in {} shards from {} corpora ({} hard-linked, {} copied)",
        out.out, out.documents, out.shards, out.inputs, out.linked, out.copied
    )?;
    Ok(())
}

/// The file operations of a merge, behind a trait so a test can check their order.
trait MergeIo {
    fn hard_link(&mut self, src: &Path, dst: &Path) -> std::io::Result<()>;
    fn copy(&mut self, src: &Path, dst: &Path) -> std::io::Result<()>;
    /// fsync of a file's data and metadata.
    fn sync_file(&mut self, path: &Path) -> std::io::Result<()>;
    /// fsync of a directory (its entries: the links and files made in it).
    fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()>;
    fn write_manifest(&mut self, m: &Manifest, dir: &Path) -> anyhow::Result<()>;
}

/// The file system itself.
#[derive(Debug)]
struct RealIo;

impl MergeIo for RealIo {
    fn hard_link(&mut self, src: &Path, dst: &Path) -> std::io::Result<()> {
        std::fs::hard_link(src, dst)
    }
    fn copy(&mut self, src: &Path, dst: &Path) -> std::io::Result<()> {
        std::fs::copy(src, dst).map(|_| ())
    }
    fn sync_file(&mut self, path: &Path) -> std::io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
    fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()> {
        // Opening a directory to fsync it works on Unix; elsewhere it is best effort.
        match std::fs::File::open(dir) {
            Ok(d) => d.sync_all(),
            Err(e) if cfg!(unix) => Err(e),
            Err(_) => Ok(()),
        }
    }
    fn write_manifest(&mut self, m: &Manifest, dir: &Path) -> anyhow::Result<()> {
        Ok(m.write(dir)?)
    }
}

/// Merges `dirs` into `out`. Every shard and tokenizer file placed in `out` (copied, or
/// hard-linked) is fsynced, and so are the directories holding them, before the manifest is
/// written: a crash can then leave a merge without a manifest, never a manifest naming
/// shards whose bytes were still in the page cache.
fn merge(dirs: &[PathBuf], out_dir: &Path, io: &mut dyn MergeIo) -> anyhow::Result<Out> {
    let manifests: Vec<Manifest> = dirs
        .iter()
        .map(|d| Manifest::read(d).with_context(|| format!("reading the corpus at {}", d.display())))
        .collect::<anyhow::Result<_>>()?;
    let Some(first) = manifests.first() else { bail!("no corpora to merge") };
    for (d, m) in dirs.iter().zip(&manifests).skip(1) {
        if m.vocab != first.vocab {
            bail!(
                "cannot merge {} with {}: their vocabularies differ ({})",
                d.display(),
                dirs[0].display(),
                vocab_difference(&first.vocab, &m.vocab)
            );
        }
    }
    let tokenizer_files = check_tokenizers(dirs, &manifests)?;
    prepare_out(out_dir)?;

    // Shard names stay as they are unless two inputs use the same one.
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &manifests {
        for s in &m.shards {
            *count.entry(s.name.as_str()).or_default() += 1;
        }
    }
    let mut shards: Vec<ShardStats> = Vec::new();
    let mut taken: HashSet<String> = tokenizer_files.iter().map(|(name, _)| name.clone()).collect();
    taken.insert(MANIFEST_NAME.to_string());
    let (mut linked, mut copied) = (0usize, 0usize);
    let mut placed: Vec<PathBuf> = Vec::new();
    for (i, (d, m)) in dirs.iter().zip(&manifests).enumerate() {
        for s in &m.shards {
            let name = if count.get(s.name.as_str()).copied().unwrap_or(0) > 1 || taken.contains(&s.name) {
                format!("part{i:03}-{}", s.name)
            } else {
                s.name.clone()
            };
            if !taken.insert(name.clone()) {
                bail!("two shards would be named {name} in {}", out_dir.display());
            }
            let src = d.join(&s.name);
            let len = std::fs::metadata(&src).with_context(|| format!("shard {} of {}", s.name, d.display()))?.len();
            if len != s.bytes {
                bail!(
                    "{}: {} bytes but its manifest says {} (run `motley shards verify`)",
                    src.display(),
                    len,
                    s.bytes
                );
            }
            let dst = out_dir.join(&name);
            match place(io, &src, &dst)? {
                Placed::Linked => linked += 1,
                Placed::Copied => copied += 1,
            }
            placed.push(dst);
            shards.push(ShardStats { name, ..s.clone() });
        }
    }
    let mut dirs_made = vec![out_dir.to_path_buf()];
    for (name, src) in &tokenizer_files {
        let dst = out_dir.join(name);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            if !dirs_made.iter().any(|d| d == parent) {
                dirs_made.push(parent.to_path_buf());
            }
        }
        place(io, src, &dst)?;
        placed.push(dst);
    }
    // Durable before the manifest names them: data first, then the directory entries
    // (deepest first, the output directory last).
    for p in &placed {
        io.sync_file(p).with_context(|| format!("fsync {}", p.display()))?;
    }
    dirs_made.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in &dirs_made {
        io.sync_dir(d).with_context(|| format!("fsync {}", d.display()))?;
    }
    let mut merged = Manifest::from_stats(first.vocab.clone(), shards);
    merged.tokenizers = first.tokenizers.clone();
    merged.extra = first.extra.clone();
    let sources: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    merged.extra.insert("merged_from".to_string(), serde_json::json!(sources));
    merged.check(out_dir).context("the merged corpus would be inconsistent")?;
    io.write_manifest(&merged, out_dir)?;

    Ok(Out {
        out: out_dir.display().to_string(),
        inputs: manifests.len(),
        documents: merged.num_docs,
        shards: merged.shards.len(),
        bytes: merged.bytes,
        linked,
        copied,
    })
}

/// Which part of two vocabularies differs, for the error message.
fn vocab_difference(a: &motley_shards::Vocab, b: &motley_shards::Vocab) -> String {
    let mut diffs = Vec::new();
    for m in Modality::ALL {
        match (a.modality(m), b.modality(m)) {
            (Some(x), Some(y)) if x != y => diffs.push(format!(
                "{m}: size {} / {}, offset {} / {}, latent {:?} / {:?}",
                x.vocab_size, y.vocab_size, x.offset, y.offset, x.latent_dim, y.latent_dim
            )),
            (Some(_), None) | (None, Some(_)) => diffs.push(format!("{m} present in only one")),
            _ => {}
        }
    }
    if a.specials != b.specials {
        diffs.push("specials differ".into());
    }
    if a.total_size != b.total_size {
        diffs.push(format!("total size {} / {}", a.total_size, b.total_size));
    }
    if diffs.is_empty() { "tokenizer descriptions differ".into() } else { diffs.join("; ") }
}

/// The tokenizer files named by the inputs must be the same bytes (or absent everywhere);
/// returns the files inside the first corpus to bring along, as (name in output, source).
fn check_tokenizers(dirs: &[PathBuf], manifests: &[Manifest]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    let (Some(dir0), Some(m0)) = (dirs.first(), manifests.first()) else { return Ok(files) };
    for m in Modality::ALL {
        let p0 = tokenizer_path(dir0, m0, m);
        let h0 = p0.as_deref().map(hash_file).transpose()?.flatten();
        for (d, man) in dirs.iter().zip(manifests).skip(1) {
            let p = tokenizer_path(d, man, m);
            let h = p.as_deref().map(hash_file).transpose()?.flatten();
            if h != h0 {
                bail!(
                    "cannot merge {} with {}: their {m} tokenizers differ ({} vs {})",
                    d.display(),
                    dir0.display(),
                    p.map_or("none".into(), |p| p.display().to_string()),
                    p0.as_ref().map_or("none".into(), |p| p.display().to_string())
                );
            }
        }
        // Files inside the corpus travel with it; absolute paths elsewhere stay where they are.
        if let (Some(p), Some(_)) = (&p0, &h0)
            && let Ok(rel) = p.strip_prefix(dir0)
            && rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            files.push((rel.display().to_string(), p.clone()));
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// blake3 of a file, None when it does not exist.
fn hash_file(p: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::File::open(p) {
        Ok(mut f) => {
            let mut h = blake3::Hasher::new();
            std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", p.display()))?;
            Ok(Some(h.finalize().to_hex().to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening {}", p.display())),
    }
}

/// Creates the output directory; refuses one that already holds files.
fn prepare_out(out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?;
        if entries.next().is_some() {
            bail!("output {} exists and is not empty", out.display());
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}

/// Hard-links `src` to `dst`, copying when linking fails (another filesystem, no support).
fn place(io: &mut dyn MergeIo, src: &Path, dst: &Path) -> anyhow::Result<Placed> {
    match io.hard_link(src, dst) {
        Ok(()) => Ok(Placed::Linked),
        Err(e) => {
            tracing::debug!("hard link {} -> {} failed ({e}); copying", src.display(), dst.display());
            io.copy(src, dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
            Ok(Placed::Copied)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use motley_shards::{CorpusWriter, Document, Segment, Vocab, WriterProperties};

    /// What the merge did, in order.
    #[derive(Debug, Clone, PartialEq)]
    enum Op {
        Copy(PathBuf),
        SyncFile(PathBuf),
        SyncDir(PathBuf),
        Manifest,
    }

    /// The real file system, recorded; hard links always fail, so every file is copied.
    #[derive(Debug, Default)]
    struct Recorder(Vec<Op>);

    impl MergeIo for Recorder {
        fn hard_link(&mut self, _: &Path, _: &Path) -> std::io::Result<()> {
            Err(std::io::Error::other("no links here"))
        }
        fn copy(&mut self, src: &Path, dst: &Path) -> std::io::Result<()> {
            self.0.push(Op::Copy(dst.to_path_buf()));
            RealIo.copy(src, dst)
        }
        fn sync_file(&mut self, path: &Path) -> std::io::Result<()> {
            self.0.push(Op::SyncFile(path.to_path_buf()));
            RealIo.sync_file(path)
        }
        fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()> {
            self.0.push(Op::SyncDir(dir.to_path_buf()));
            RealIo.sync_dir(dir)
        }
        fn write_manifest(&mut self, m: &Manifest, dir: &Path) -> anyhow::Result<()> {
            self.0.push(Op::Manifest);
            RealIo.write_manifest(m, dir)
        }
    }

    fn corpus(dir: &Path, prefix: &str) -> anyhow::Result<()> {
        let props = WriterProperties::builder().max_shard_bytes(1).build();
        let mut w = CorpusWriter::create(dir, &Vocab::build(50, 0, 0, None), props, prefix)?;
        for i in 0..3 {
            w.add_document(&Document::new(vec![Segment::tokens(Modality::Text, vec![i, 1, 2])]))?;
        }
        let mut m = w.finish_with_manifest()?;
        std::fs::create_dir_all(dir.join("tok"))?;
        std::fs::write(dir.join("tok/text.json"), "{}")?;
        m.tokenizers.insert("text".into(), serde_json::json!("tok/text.json"));
        m.write(dir)?;
        Ok(())
    }

    #[test]
    fn copies_are_fsynced_before_the_manifest_is_written() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let (a, b, out) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("out"));
        corpus(&a, "a")?;
        corpus(&b, "b")?;
        let mut rec = Recorder::default();
        let summary = merge(&[a, b], &out, &mut rec)?;
        assert_eq!((summary.copied, summary.documents), (6, 6));
        let ops = rec.0;
        let manifest_at = ops.iter().position(|o| *o == Op::Manifest).ok_or_else(|| anyhow::anyhow!("{ops:?}"))?;
        let copies: Vec<&PathBuf> =
            ops.iter().filter_map(|o| if let Op::Copy(p) = o { Some(p) } else { None }).collect();
        assert_eq!(copies.len(), 7, "six shards and the tokenizer file: {ops:?}");
        for p in copies {
            let synced = ops[..manifest_at].iter().position(|o| *o == Op::SyncFile(p.clone()));
            let copied = ops.iter().position(|o| *o == Op::Copy(p.clone()));
            assert!(synced > copied, "{} fsynced after its copy, before the manifest: {ops:?}", p.display());
        }
        for d in [out.join("tok"), out.clone()] {
            assert!(ops[..manifest_at].contains(&Op::SyncDir(d.clone())), "{} fsynced: {ops:?}", d.display());
        }
        assert!(Manifest::read(&out).is_ok());
        Ok(())
    }
}
