//! `motley shards head`: documents in human-readable form. Text is decoded with the corpus's
//! tokenizer when the manifest names one (ids otherwise); image and speech segments are
//! summarized by shape, duration, source and first ids.

use std::io::Write;
use std::path::PathBuf;

use motley_shards::{Corpus, DocumentRef, Modality, SegmentRef, SegmentView};
use motley_tokenizers::TextTokenizer;
use serde::Serialize;

use super::{Found, find_tokenizer, seconds};
use crate::output::{self, Ctx};

/// Ids shown for a segment that is not decoded.
const PREVIEW_IDS: usize = 16;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Corpus directory (holds manifest.json).
    dir: PathBuf,
    /// Number of documents to show (default 5, or 1 with --doc).
    #[arg(short = 'n', long = "num")]
    n: Option<u64>,
    /// Start at this document id.
    #[arg(long)]
    doc: Option<u64>,
    /// Longest decoded text shown per segment, in characters (0: no limit).
    #[arg(long, default_value_t = 400)]
    max_chars: usize,
}

#[derive(Debug, Serialize)]
struct DocOut {
    doc: u64,
    shard: String,
    positions: u64,
    segments: Vec<SegOut>,
}

#[derive(Debug, Serialize)]
struct SegOut {
    index: usize,
    modality: Modality,
    /// `tokens` or `latent`.
    kind: &'static str,
    /// Sequence positions: tokens or latent vectors.
    len: usize,
    latent_dim: Option<u32>,
    grid: Option<(u16, u16)>,
    frame_rate: Option<f32>,
    seconds: Option<f64>,
    source: Option<String>,
    /// Decoded text (text segments, when the tokenizer is available).
    text: Option<String>,
    first_ids: Vec<u32>,
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let corpus = Corpus::open(&args.dir)?;
    let text_tok =
        match find_tokenizer(corpus.dir(), corpus.manifest(), Modality::Text, |p| TextTokenizer::from_file(p)) {
            Found::Loaded(t) => Some(t),
            Found::Missing(why) => {
                if corpus.manifest().totals.text.segments > 0 {
                    tracing::info!("showing text as ids: {why}");
                }
                None
            }
        };
    let start = args.doc.unwrap_or(0);
    let n = args.n.unwrap_or(if args.doc.is_some() { 1 } else { 5 });
    if args.doc.is_some() && start >= corpus.num_docs() {
        anyhow::bail!("document {start} out of range: {} has {} documents", args.dir.display(), corpus.num_docs());
    }
    let end = start.saturating_add(n).min(corpus.num_docs());
    let mut docs_json = Vec::new();
    let mut w = std::io::stdout().lock();
    for item in corpus.iter_from(start).take((end - start) as usize) {
        let (doc_id, doc) = item?;
        let doc_out = describe(&corpus, doc_id, &doc, text_tok.as_ref())?;
        if ctx.json {
            docs_json.push(doc_out);
        } else {
            print_doc(&mut w, &doc_out, args.max_chars)?;
        }
    }
    if ctx.json {
        drop(w);
        output::json(&docs_json)?;
    }
    Ok(())
}

fn describe(
    corpus: &Corpus,
    doc_id: u64,
    doc: &DocumentRef<'_>,
    text_tok: Option<&TextTokenizer>,
) -> anyhow::Result<DocOut> {
    let (shard_i, _) = corpus.locate(doc_id)?;
    let shard = corpus.manifest().shards.get(shard_i).map(|s| s.name.clone()).unwrap_or_default();
    let segments = doc.segments().enumerate().map(|(i, s)| segment(i, &s, text_tok)).collect();
    Ok(DocOut { doc: doc_id, shard, positions: doc.num_positions(), segments })
}

fn segment(index: usize, s: &SegmentRef<'_>, text_tok: Option<&TextTokenizer>) -> SegOut {
    let (kind, latent_dim, first_ids, text) = match s.data() {
        SegmentView::Tokens(ids) => {
            let text = if s.modality() == Modality::Text {
                text_tok.and_then(|t| match t.decode(&ids.to_vec()) {
                    Ok(txt) => Some(txt),
                    Err(e) => {
                        tracing::warn!("text segment {index}: {e}");
                        None
                    }
                })
            } else {
                None
            };
            let first = (0..ids.len().min(PREVIEW_IDS)).filter_map(|j| ids.get(j)).collect();
            ("tokens", None, first, text)
        }
        SegmentView::Latent { dim, .. } => ("latent", Some(dim), Vec::new(), None),
    };
    SegOut {
        index,
        modality: s.modality(),
        kind,
        len: s.len(),
        latent_dim,
        grid: s.grid(),
        frame_rate: s.frame_rate(),
        seconds: if s.modality() == Modality::Speech { seconds(s.len(), s.frame_rate()) } else { None },
        source: s.source().map(str::to_string),
        text,
        first_ids,
    }
}

/// Text shortened to `max` characters (0: no limit), with the count of what was cut.
fn clip(text: &str, max: usize) -> String {
    if max == 0 {
        return text.to_string();
    }
    let total = text.chars().count();
    if total <= max {
        return text.to_string();
    }
    let head: String = text.chars().take(max).collect();
    format!("{head}… (+{} chars)", total - max)
}

fn print_doc(w: &mut impl Write, d: &DocOut, max_chars: usize) -> anyhow::Result<()> {
    writeln!(w, "── doc {} ({}, {} segments, {} positions)", d.doc, d.shard, d.segments.len(), d.positions)?;
    for s in &d.segments {
        let mut head = format!("  [{}] {} ", s.index, s.modality);
        match (s.kind, s.modality) {
            ("latent", _) => head.push_str(&format!("latent {}×{}", s.len, s.latent_dim.unwrap_or(0))),
            (_, Modality::Text) => head.push_str(&format!("{} tokens", s.len)),
            (_, Modality::Image) => head.push_str(&format!("{} codes", s.len)),
            (_, Modality::Speech) => head.push_str(&format!("{} units", s.len)),
        }
        if let Some((r, c)) = s.grid {
            head.push_str(&format!(", grid {r}×{c}"));
        }
        if let Some(fr) = s.frame_rate {
            head.push_str(&format!(", {fr} Hz"));
        }
        if let Some(sec) = s.seconds {
            head.push_str(&format!(", {sec:.2} s"));
        }
        if let Some(src) = &s.source {
            head.push_str(&format!(", from {src}"));
        }
        writeln!(w, "{head}")?;
        match &s.text {
            Some(t) => writeln!(w, "      {:?}", clip(t, max_chars))?,
            None if s.kind == "tokens" => {
                let shown: Vec<String> = s.first_ids.iter().map(u32::to_string).collect();
                let more = s.len.saturating_sub(s.first_ids.len());
                let tail = if more > 0 { format!(", ... +{more}") } else { String::new() };
                writeln!(w, "      ids [{}{tail}]", shown.join(", "))?;
            }
            None => {}
        }
    }
    Ok(())
}
