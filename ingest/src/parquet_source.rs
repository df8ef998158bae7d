//! Parquet source reader (arrow/parquet): text, caption/transcript and image/audio columns,
//! including nulls, large binary, dictionary-encoded strings and HF `{bytes, path}` structs.
//!
//! Only the needed columns are decoded, a few rows at a time (fewer for media columns), so a
//! file's memory use is bounded by one batch whatever its size.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use motley_tokenizers::error::catch_panic;

use crate::error::{Reason, RecordError};
use crate::plan::Unit;
use crate::recipe::SourceKind;
use crate::source::{BlobColumn, Item, RawPart, RawRecord, ReadCtx, TextColumn};

/// Rows per decoded batch: small for media (megabytes per row), larger for text.
const TEXT_BATCH_ROWS: usize = 1024;
const MEDIA_BATCH_ROWS: usize = 16;

fn file_err(file: &Path, reason: Reason, e: impl Into<String>) -> RecordError {
    RecordError { file: file.display().to_string(), record: None, byte_offset: None, reason, error: e.into() }
}

pub(crate) fn read_parquet(
    ctx: &ReadCtx<'_>,
    unit: &Unit,
    file: &Arc<Path>,
    f: &mut dyn FnMut(Item) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let spec = ctx.spec;
    let handle = match std::fs::File::open(file) {
        Ok(h) => h,
        Err(e) => return f(Err(file_err(file, Reason::Io, format!("open: {e}")))),
    };
    // The parquet crate overflows or indexes out of bounds on some corrupt footers and pages
    // instead of returning an error: every call that decodes file bytes runs under a guard,
    // so a broken file is its own error, not the run's end.
    let builder = match guarded("reading the footer", || ParquetRecordBatchReaderBuilder::try_new(handle)) {
        Ok(b) => b,
        Err(e) => return f(Err(file_err(file, Reason::Parquet, e))),
    };
    // Which columns this source reads, and whether each is required.
    let (media_field, text_required) = match spec.kind {
        SourceKind::Text => (None, true),
        SourceKind::Image => (Some(spec.image_field()), spec.text_field.is_some()),
        SourceKind::Speech => (Some(spec.audio_field()), spec.text_field.is_some()),
        SourceKind::Interleaved => {
            return f(Err(file_err(file, Reason::WrongType, "interleaved sources read JSONL only, not Parquet")));
        }
    };
    let roots = builder.parquet_schema().root_schema().get_fields();
    let root_names: Vec<String> = roots.iter().map(|r| r.name().to_string()).collect();
    let find = |name: &str| root_names.iter().position(|n| n == name);
    let text_idx = find(spec.text_field());
    if text_required && text_idx.is_none() {
        return f(Err(file_err(
            file,
            Reason::MissingField,
            format!("no column {:?} (columns: {root_names:?})", spec.text_field()),
        )));
    }
    let media_idx = match media_field {
        Some(m) => match find(m) {
            Some(i) => Some(i),
            None => {
                return f(Err(file_err(
                    file,
                    Reason::MissingField,
                    format!("no column {m:?} (columns: {root_names:?})"),
                )));
            }
        },
        None => None,
    };
    let indices: Vec<usize> = text_idx.into_iter().chain(media_idx).collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
    let rows = if media_field.is_some() { MEDIA_BATCH_ROWS } else { TEXT_BATCH_ROWS };
    let mut builder = builder.with_projection(mask).with_batch_size(rows);
    if let Some((start, end)) = unit.row_groups {
        builder = builder.with_row_groups((start..end).collect());
    }
    let mut reader = match guarded("planning the read", || builder.build()) {
        Ok(r) => r,
        Err(e) => return f(Err(file_err(file, Reason::Parquet, e))),
    };
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let file_name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut row = unit.first_row;
    loop {
        let batch = match guarded("decoding pages", || reader.next().transpose()) {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                // A corrupt page ends the unit: later rows cannot be located reliably.
                let mut err = file_err(file, Reason::Parquet, e);
                err.record = Some(row);
                return f(Err(err));
            }
        };
        let text_col = match batch.column_by_name(spec.text_field()) {
            Some(c) => match TextColumn::from_array(c) {
                Ok(t) => Some(t),
                Err(e) => {
                    return f(Err(file_err(file, Reason::WrongType, format!("column {:?} {e}", spec.text_field()))));
                }
            },
            None => None,
        };
        let media_col = match media_field.and_then(|n| batch.column_by_name(n).map(|c| (n, c))) {
            Some((n, c)) => match BlobColumn::from_array(c) {
                Ok(b) => Some(b),
                Err(e) => return f(Err(file_err(file, Reason::WrongType, format!("column {n:?} {e}")))),
            },
            None => None,
        };
        for i in 0..batch.num_rows() {
            let index = row;
            row += 1;
            let err = |reason: Reason, e: String| RecordError {
                file: file.display().to_string(),
                record: Some(index),
                byte_offset: None,
                reason,
                error: e,
            };
            let text = match &text_col {
                Some(c) => match c.get(i) {
                    Ok(t) => t.map(str::to_string),
                    Err(e) => {
                        f(Err(err(Reason::InvalidUtf8, format!("column {:?}: {e}", spec.text_field()))))?;
                        continue;
                    }
                },
                None => None,
            };
            let item = match (&media_col, media_field) {
                (Some(mc), Some(mname)) => match mc.get(i, &base, &format!("{file_name}#{index}")) {
                    Err(e) => Err(err(Reason::WrongType, format!("column {mname:?}: {e}"))),
                    Ok(None) => Err(err(Reason::MissingField, format!("column {mname:?} is null"))),
                    Ok(Some(blob)) => {
                        let media =
                            if spec.kind == SourceKind::Speech { RawPart::Audio(blob) } else { RawPart::Image(blob) };
                        Ok(RawRecord {
                            file: file.clone(),
                            index,
                            byte_offset: None,
                            parts: ctx_pair(ctx, file, index, text, media),
                        })
                    }
                },
                _ => match text {
                    None => Err(err(Reason::MissingField, format!("column {:?} is null", spec.text_field()))),
                    Some(t) if t.trim().is_empty() => {
                        Err(err(Reason::Empty, format!("column {:?} is empty", spec.text_field())))
                    }
                    Some(t) => {
                        Ok(RawRecord { file: file.clone(), index, byte_offset: None, parts: vec![RawPart::Text(t)] })
                    }
                },
            };
            f(item)?;
        }
    }
    ControlFlow::Continue(())
}

/// A parquet call's error or panic as one message.
pub(crate) fn guarded<T, E: std::fmt::Display>(op: &str, f: impl FnOnce() -> Result<T, E>) -> Result<T, String> {
    match catch_panic(f) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(msg) => Err(format!("the Parquet decoder panicked while {op}: {msg}")),
    }
}

fn ctx_pair(ctx: &ReadCtx<'_>, file: &Path, index: u64, text: Option<String>, media: RawPart) -> Vec<RawPart> {
    ctx.pair(file, index, text, media)
}
