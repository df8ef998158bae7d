//! `motley shards export-parquet`: one Parquet row per segment — document id, segment index,
//! modality, token count, source and the ids as a list column — for pyarrow, pandas and DuckDB.
//! Streams documents in order and flushes row groups by size, so memory stays flat.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use arrow::array::{ArrayRef, ListBuilder, StringBuilder, UInt32Builder, UInt64Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use indicatif::{ProgressBar, ProgressStyle};
use motley_shards::{Corpus, Ids, SegmentView};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::Serialize;

use crate::output::{self, Ctx};

/// Rows (segments) per record batch handed to the writer.
const BATCH_ROWS: usize = 8192;
/// Ids buffered per record batch before it is handed over early (long segments).
const BATCH_IDS: usize = 4 << 20;
/// Row group is flushed once its buffered (encoded) size passes this.
const ROW_GROUP_BYTES: usize = 64 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Corpus directory (holds manifest.json).
    dir: PathBuf,
    /// Parquet file to write (written as FILE.tmp, renamed when complete).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Out {
    out: String,
    documents: u64,
    rows: u64,
    ids: u64,
    bytes: u64,
}

/// Column builders of one record batch.
struct Columns {
    doc: UInt64Builder,
    segment: UInt32Builder,
    modality: StringBuilder,
    tokens: UInt32Builder,
    source: StringBuilder,
    ids: ListBuilder<UInt32Builder>,
    rows: usize,
    n_ids: usize,
}

impl Columns {
    fn new() -> Self {
        Columns {
            doc: UInt64Builder::new(),
            segment: UInt32Builder::new(),
            modality: StringBuilder::new(),
            tokens: UInt32Builder::new(),
            source: StringBuilder::new(),
            ids: ListBuilder::new(UInt32Builder::new()).with_field(Field::new("item", DataType::UInt32, false)),
            rows: 0,
            n_ids: 0,
        }
    }

    fn schema() -> SchemaRef {
        let item = Arc::new(Field::new("item", DataType::UInt32, false));
        Arc::new(Schema::new(vec![
            Field::new("doc", DataType::UInt64, false),
            Field::new("segment", DataType::UInt32, false),
            Field::new("modality", DataType::Utf8, false),
            Field::new("tokens", DataType::UInt32, false),
            Field::new("source", DataType::Utf8, true),
            // Null for continuous (latent) segments, which have no ids.
            Field::new("ids", DataType::List(item), true),
        ]))
    }

    fn finish(&mut self, schema: &SchemaRef) -> anyhow::Result<RecordBatch> {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.doc.finish()),
            Arc::new(self.segment.finish()),
            Arc::new(self.modality.finish()),
            Arc::new(self.tokens.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.ids.finish()),
        ];
        self.rows = 0;
        self.n_ids = 0;
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let corpus = Corpus::open(&args.dir)?;
    let schema = Columns::schema();
    let mut tmp = args.out.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let props = WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?)).build();
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props))?;

    let pb = ProgressBar::new(corpus.num_docs());
    pb.set_style(
        ProgressStyle::with_template("export-parquet {bar:30} {pos}/{len} docs {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut cols = Columns::new();
    let (mut rows, mut ids_total) = (0u64, 0u64);
    let result = (|| -> anyhow::Result<()> {
        for item in corpus.iter() {
            let (doc_id, doc) = item?;
            for (i, seg) in doc.segments().enumerate() {
                cols.doc.append_value(doc_id);
                cols.segment.append_value(i as u32);
                cols.modality.append_value(seg.modality().as_str());
                cols.tokens.append_value(seg.len() as u32);
                cols.source.append_option(seg.source());
                match seg.data() {
                    SegmentView::Tokens(ids) => {
                        match ids {
                            Ids::U32(v) => cols.ids.values().append_slice(v),
                            other => cols.ids.values().append_slice(&other.to_vec()),
                        }
                        cols.ids.append(true);
                        cols.n_ids += ids.len();
                        ids_total += ids.len() as u64;
                    }
                    SegmentView::Latent { .. } => cols.ids.append(false),
                }
                cols.rows += 1;
                rows += 1;
                if cols.rows >= BATCH_ROWS || cols.n_ids >= BATCH_IDS {
                    writer.write(&cols.finish(&schema)?)?;
                    if writer.in_progress_size() >= ROW_GROUP_BYTES {
                        writer.flush()?;
                    }
                }
            }
            if doc_id % 1024 == 0 {
                pb.set_position(doc_id);
            }
        }
        if cols.rows > 0 {
            writer.write(&cols.finish(&schema)?)?;
        }
        Ok(())
    })();
    pb.finish_and_clear();
    if let Err(e) = result {
        drop(writer);
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    writer.close()?;
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), args.out.display()))?;
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    let out = Out { out: args.out.display().to_string(), documents: corpus.num_docs(), rows, ids: ids_total, bytes };
    if ctx.json {
        return output::json(&out);
    }
    output::line(format!(
        "{}: {} rows (segments) of {} documents, {} ids, {} bytes",
        out.out, rows, out.documents, ids_total, bytes
    ))
}
