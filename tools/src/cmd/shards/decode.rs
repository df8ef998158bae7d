//! `motley shards decode`: writes one document's parts as files a person can open — text as
//! .txt, images as PNG (VQ codebook or latent-patch inverse), speech as WAV (Griffin-Lim)
//! plus a spectrogram PNG — through the tokenizers the corpus's manifest names. A part whose
//! decoder is missing is written as its ids (`.ids.txt`), and the output says so.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use motley_shards::{Corpus, Modality, SegmentData};
use motley_tokenizers::ModalityTokenizer;
use serde::Serialize;

use super::{Found, find_tokenizer};
use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Corpus directory (holds manifest.json).
    dir: PathBuf,
    /// Document id.
    #[arg(long)]
    doc: u64,
    /// Output directory (created; existing files of the same names are replaced).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Out {
    doc: u64,
    out: String,
    parts: Vec<Part>,
    /// Modalities whose decoder was unavailable, with the reason.
    missing_decoders: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct Part {
    segment: usize,
    modality: Modality,
    files: Vec<String>,
    /// False when the ids were written because no decoder could be used.
    decoded: bool,
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let corpus = Corpus::open(&args.dir)?;
    let doc = corpus
        .get(args.doc)
        .with_context(|| format!("reading document {} of {}", args.doc, args.dir.display()))?
        .to_owned();
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;

    let mut decoders: BTreeMap<Modality, Found<Box<dyn ModalityTokenizer>>> = BTreeMap::new();
    for m in doc.segments.iter().map(|s| s.modality) {
        decoders.entry(m).or_insert_with(|| {
            match find_tokenizer(corpus.dir(), corpus.manifest(), m, |p| motley_tokenizers::load_any(p)) {
                Found::Loaded(t) if t.modality() != m => {
                    Found::Missing(format!("the {m} tokenizer file holds a {} tokenizer", t.modality()))
                }
                other => other,
            }
        });
    }

    let mut parts = Vec::new();
    let mut missing = BTreeMap::new();
    for (i, seg) in doc.segments.iter().enumerate() {
        let stem = format!("{:03}-{}", i, seg.modality);
        let rendered = match decoders.get(&seg.modality) {
            Some(Found::Loaded(t)) => match t.render(seg) {
                Ok(r) => Ok(r),
                Err(e) => Err(format!("decoding failed: {e}")),
            },
            Some(Found::Missing(why)) => Err(why.clone()),
            None => Err("no decoder".to_string()),
        };
        let (files, decoded) = match rendered {
            Ok(items) => {
                let mut files = Vec::new();
                for (k, r) in items.iter().enumerate() {
                    // Speech renders a WAV and a spectrogram PNG: name the second by what it is.
                    let name = if seg.modality == Modality::Speech && r.extension == "png" {
                        format!("{stem}.spectrogram.png")
                    } else if k == 0 {
                        format!("{stem}.{}", r.extension)
                    } else {
                        format!("{stem}.{k}.{}", r.extension)
                    };
                    write_file(&args.out.join(&name), &r.bytes)?;
                    files.push(name);
                }
                (files, true)
            }
            Err(why) => {
                tracing::warn!("segment {i} ({}): {why}; writing its ids instead", seg.modality);
                missing.entry(seg.modality.as_str().to_string()).or_insert(why);
                let name = format!("{stem}.ids.txt");
                write_file(&args.out.join(&name), ids_text(&seg.data).as_bytes())?;
                (vec![name], false)
            }
        };
        parts.push(Part { segment: i, modality: seg.modality, files, decoded });
    }
    let out = Out { doc: args.doc, out: args.out.display().to_string(), parts, missing_decoders: missing };
    if ctx.json {
        return output::json(&out);
    }
    let mut w = std::io::stdout().lock();
    for p in &out.parts {
        let note = if p.decoded { "" } else { "  (ids: decoder missing)" };
        for f in &p.files {
            writeln!(w, "{}{note}", args.out.join(f).display())?;
        }
    }
    for (m, why) in &out.missing_decoders {
        writeln!(w, "note: {m} decoder missing: {why}")?;
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Ids one per line group: token ids space-separated, latent vectors one per line.
fn ids_text(data: &SegmentData) -> String {
    match data {
        SegmentData::Tokens(ids) => {
            let mut s: String = ids.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" ");
            s.push('\n');
            s
        }
        SegmentData::Latent { dim, data } => {
            let mut s = String::new();
            for row in data.chunks((*dim).max(1) as usize) {
                let vals: Vec<String> = row.iter().map(|v| v.to_f32().to_string()).collect();
                s.push_str(&vals.join(" "));
                s.push('\n');
            }
            s
        }
    }
}
