//! Source readers: stream the records of one planned [`Unit`] (a text file, JSONL lines,
//! Parquet rows, an image or audio file with its sidecar, WebDataset samples) as raw parts, in
//! file order.
//!
//! Readers never tokenize; they hand `RawRecord`s (or the `RecordError` that made a record
//! unusable) to a callback, which decides when to stop. Images and audio referenced by path
//! are not read here but in [`load_blob`], on the worker that tokenizes them.

use std::io::{BufRead, BufReader, Read};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, LargeBinaryArray, LargeStringArray};
use arrow::datatypes::DataType;

use crate::error::{Reason, RecordError};
use crate::plan::{FileFormat, Unit};
use crate::recipe::{RecipeOptions, SourceKind, SourceSpec, SpeechMode};

/// Image or audio content: inline bytes (Parquet) or a file to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blob {
    Bytes {
        data: Vec<u8>,
        name: String,
    },
    /// A file to read; `name` is the reference as written in the input (e.g. `images/x.png`).
    Path {
        path: PathBuf,
        name: String,
    },
}

impl Blob {
    /// A short reference stored in the segment's `meta.source`.
    pub fn name(&self) -> String {
        match self {
            Blob::Bytes { name, .. } | Blob::Path { name, .. } => name.clone(),
        }
    }
}

/// One part of a record, in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawPart {
    Text(String),
    Image(Blob),
    Audio(Blob),
}

/// A record read from a source, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord {
    pub file: Arc<Path>,
    /// Record index in the file (JSONL line, Parquet row, text chunk; 0 for media files).
    pub index: u64,
    pub byte_offset: Option<u64>,
    pub parts: Vec<RawPart>,
}

impl RawRecord {
    pub fn error(&self, reason: Reason, error: impl Into<String>) -> RecordError {
        RecordError {
            file: self.file.display().to_string(),
            record: Some(self.index),
            byte_offset: self.byte_offset,
            reason,
            error: error.into(),
        }
    }
}

pub type Item = Result<RawRecord, RecordError>;

fn rec_err(
    file: &Path,
    index: Option<u64>,
    byte_offset: Option<u64>,
    reason: Reason,
    error: impl Into<String>,
) -> RecordError {
    RecordError { file: file.display().to_string(), record: index, byte_offset, reason, error: error.into() }
}

/// Reads the bytes of a blob; a missing file is `MissingFile`, other failures `Io`.
pub fn load_blob(blob: &Blob) -> Result<std::borrow::Cow<'_, [u8]>, (Reason, String)> {
    match blob {
        Blob::Bytes { data, .. } => Ok(std::borrow::Cow::Borrowed(data)),
        Blob::Path { path: p, .. } => match std::fs::read(p) {
            Ok(d) => Ok(std::borrow::Cow::Owned(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err((Reason::MissingFile, format!("{} does not exist", p.display())))
            }
            Err(e) => Err((Reason::Io, format!("read {}: {e}", p.display()))),
        },
    }
}

/// A number in [0, 1) fixed by (seed, file name, record): order choices that do not depend
/// on scheduling, part count or where the corpus is mounted.
pub fn unit_draw(seed: u64, file: &Path, index: u64) -> f64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(file.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
    h.update(&index.to_le_bytes());
    let b = h.finalize();
    let mut x = [0u8; 8];
    x.copy_from_slice(&b.as_bytes()[..8]);
    (u64::from_le_bytes(x) >> 11) as f64 / (1u64 << 53) as f64
}

/// Everything a reader needs to know about its source.
#[derive(Debug, Clone)]
pub struct ReadCtx<'a> {
    pub spec: &'a SourceSpec,
    pub options: &'a RecipeOptions,
}

impl ReadCtx<'_> {
    /// Builds the parts of a caption/transcript + media record, ordered by `text_first`.
    pub(crate) fn pair(&self, file: &Path, index: u64, text: Option<String>, media: RawPart) -> Vec<RawPart> {
        let text = text.filter(|t| !t.trim().is_empty());
        let text = match self.spec.kind {
            SourceKind::Speech if self.spec.speech_mode() == SpeechMode::SpeechOnly => None,
            _ => text,
        };
        match text {
            None => vec![media],
            Some(t) => {
                if unit_draw(self.options.seed, file, index) < self.spec.text_first() {
                    vec![RawPart::Text(t), media]
                } else {
                    vec![media, RawPart::Text(t)]
                }
            }
        }
    }

    /// The source's media part (audio for speech sources, else an image) holding `blob`.
    pub(crate) fn media(&self, blob: Blob) -> RawPart {
        match self.spec.kind {
            SourceKind::Speech => RawPart::Audio(blob),
            _ => RawPart::Image(blob),
        }
    }
}

/// Streams the records of `unit` into `f` until the unit ends or `f` breaks.
pub fn read_unit(ctx: &ReadCtx<'_>, unit: &Unit, f: &mut dyn FnMut(Item) -> ControlFlow<()>) -> ControlFlow<()> {
    let file: Arc<Path> = Arc::from(unit.file.as_path());
    match unit.format {
        FileFormat::PlainText => read_plain_text(ctx, &file, f),
        FileFormat::Jsonl => read_jsonl(ctx, &file, f),
        FileFormat::Parquet => crate::parquet_source::read_parquet(ctx, unit, &file, f),
        FileFormat::ImageFile | FileFormat::AudioFile => read_media_file(ctx, &file, f),
        FileFormat::WebDataset => crate::webdataset::read_webdataset(ctx, &file, f),
    }
}

fn read_plain_text(ctx: &ReadCtx<'_>, file: &Arc<Path>, f: &mut dyn FnMut(Item) -> ControlFlow<()>) -> ControlFlow<()> {
    let handle = match std::fs::File::open(file) {
        Ok(h) => h,
        Err(e) => return f(Err(rec_err(file, None, None, Reason::Io, format!("open: {e}")))),
    };
    let max = (ctx.options.max_text_bytes as usize).max(1);
    let cap = max.saturating_mul(2);
    let mut reader = BufReader::with_capacity(1 << 16, handle);
    let mut chunk: Vec<u8> = Vec::new();
    let (mut index, mut offset, mut chunk_start) = (0u64, 0u64, 0u64);
    loop {
        // Never past the cap in one read: a file without newlines is cut into documents too,
        // and a record's memory stays bounded.
        let room = cap.saturating_sub(chunk.len()).max(1) as u64;
        match (&mut reader).take(room).read_until(b'\n', &mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                offset += n as u64;
                if chunk.last() != Some(&b'\n') && chunk.len() >= cap {
                    // A line longer than twice max_text_bytes: cut inside it.
                    let cut = cut_inside_line(&chunk, max);
                    let rest = chunk.split_off(cut);
                    f(text_item(file, index, chunk_start, std::mem::replace(&mut chunk, rest)))?;
                    index += 1;
                    chunk_start += cut as u64;
                    continue;
                }
                let blank = chunk[chunk.len() - n..].iter().all(u8::is_ascii_whitespace);
                if chunk.len() >= cap || (chunk.len() >= max && blank) {
                    f(text_item(file, index, chunk_start, std::mem::take(&mut chunk)))?;
                    index += 1;
                    chunk_start = offset;
                }
            }
            Err(e) => {
                return f(Err(rec_err(file, Some(index), Some(offset), Reason::Io, format!("read: {e}"))));
            }
        }
    }
    if !chunk.is_empty() || index == 0 {
        f(text_item(file, index, chunk_start, chunk))?;
    }
    ControlFlow::Continue(())
}

/// Where to cut `chunk` (at least `max` bytes, no newline at its end) inside its last line:
/// after the last ASCII whitespace at or past `max`, so words stay whole and the document
/// holds at least `max` bytes; else at the last UTF-8 character boundary, so no character is
/// split. Always in `1..=chunk.len()`.
fn cut_inside_line(chunk: &[u8], max: usize) -> usize {
    if let Some(i) = chunk.iter().rposition(u8::is_ascii_whitespace).filter(|&i| i >= max) {
        return i + 1;
    }
    // The last character's lead byte is among the last four bytes; leave that character
    // for the next document when it is incomplete.
    let len = chunk.len();
    let lead = (len.saturating_sub(4)..len).rev().find(|&j| chunk[j] & 0xC0 != 0x80);
    match lead {
        Some(j) if j > 0 => {
            let b = chunk[j];
            let char_len = if b < 0x80 {
                1
            } else if b >= 0xF0 {
                4
            } else if b >= 0xE0 {
                3
            } else {
                2
            };
            if j + char_len > len { j } else { len }
        }
        // Not UTF-8 (the record is reported as such) or one character: cut at the cap.
        _ => len,
    }
}

fn text_item(file: &Arc<Path>, index: u64, start: u64, bytes: Vec<u8>) -> Item {
    match String::from_utf8(bytes) {
        Err(e) => {
            let at = start + e.utf8_error().valid_up_to() as u64;
            Err(rec_err(file, Some(index), Some(start), Reason::InvalidUtf8, format!("invalid UTF-8 at byte {at}")))
        }
        Ok(s) if s.trim().is_empty() => Err(rec_err(file, Some(index), Some(start), Reason::Empty, "no text")),
        Ok(s) => Ok(RawRecord { file: file.clone(), index, byte_offset: Some(start), parts: vec![RawPart::Text(s)] }),
    }
}

fn read_sidecar_text(media: &Path) -> Result<Option<String>, (Reason, String)> {
    let side = media.with_extension("txt");
    match std::fs::read(&side) {
        Ok(b) => String::from_utf8(b).map(|s| Some(s.trim().to_string())).map_err(|e| {
            (Reason::InvalidUtf8, format!("{}: invalid UTF-8 at byte {}", side.display(), e.utf8_error().valid_up_to()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err((Reason::Io, format!("read {}: {e}", side.display()))),
    }
}

fn read_media_file(ctx: &ReadCtx<'_>, file: &Arc<Path>, f: &mut dyn FnMut(Item) -> ControlFlow<()>) -> ControlFlow<()> {
    let text = match read_sidecar_text(file) {
        Ok(t) => t,
        Err((reason, e)) => return f(Err(rec_err(file, Some(0), None, reason, e))),
    };
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let media = ctx.media(Blob::Path { path: file.to_path_buf(), name });
    let parts = ctx.pair(file, 0, text, media);
    f(Ok(RawRecord { file: file.clone(), index: 0, byte_offset: None, parts }))
}

fn read_jsonl(ctx: &ReadCtx<'_>, file: &Arc<Path>, f: &mut dyn FnMut(Item) -> ControlFlow<()>) -> ControlFlow<()> {
    let handle = match std::fs::File::open(file) {
        Ok(h) => h,
        Err(e) => return f(Err(rec_err(file, None, None, Reason::Io, format!("open: {e}")))),
    };
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut reader = BufReader::with_capacity(1 << 16, handle);
    let mut line = Vec::new();
    let (mut index, mut offset) = (0u64, 0u64);
    loop {
        line.clear();
        let n = match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return f(Err(rec_err(file, Some(index), Some(offset), Reason::Io, format!("read: {e}")))),
        };
        let start = offset;
        offset += n as u64;
        if line.iter().all(u8::is_ascii_whitespace) {
            // Blank lines (a trailing newline, spacing) are not records.
            continue;
        }
        let item = parse_jsonl_record(ctx, file, &base, index, start, &line);
        index += 1;
        f(item)?;
    }
    ControlFlow::Continue(())
}

fn parse_jsonl_record(ctx: &ReadCtx<'_>, file: &Arc<Path>, base: &Path, index: u64, offset: u64, line: &[u8]) -> Item {
    let err = |reason: Reason, e: String| rec_err(file, Some(index), Some(offset), reason, e);
    let text = std::str::from_utf8(line)
        .map_err(|e| err(Reason::InvalidUtf8, format!("invalid UTF-8 at byte {}", offset + e.valid_up_to() as u64)))?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| err(Reason::Json, e.to_string()))?;
    let serde_json::Value::Object(obj) = value else {
        return Err(err(Reason::Json, "line is not a JSON object".into()));
    };
    let spec = ctx.spec;
    let get_text = |key: &str, required: bool| -> Result<Option<String>, RecordError> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) if required => {
                Err(err(Reason::MissingField, format!("no {key:?} field")))
            }
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(err(Reason::WrongType, format!("{key:?} is {}, not a string", json_type(other)))),
        }
    };
    let get_blob = |key: &str| -> Result<Blob, RecordError> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Err(err(Reason::MissingField, format!("no {key:?} field"))),
            Some(v) => json_blob(v, base).map_err(|e| err(Reason::WrongType, format!("{key:?}: {e}"))),
        }
    };
    let parts = match spec.kind {
        SourceKind::Text => {
            let t = get_text(spec.text_field(), true)?.unwrap_or_default();
            if t.trim().is_empty() {
                return Err(err(Reason::Empty, format!("{:?} is empty", spec.text_field())));
            }
            vec![RawPart::Text(t)]
        }
        SourceKind::Image | SourceKind::Speech => {
            let key = if spec.kind == SourceKind::Image { spec.image_field() } else { spec.audio_field() };
            let blob = get_blob(key)?;
            let text = get_text(spec.text_field(), false)?;
            ctx.pair(file, index, text, ctx.media(blob))
        }
        SourceKind::Interleaved => {
            let key = spec.parts_field();
            let list = match obj.get(key) {
                None | Some(serde_json::Value::Null) => {
                    return Err(err(Reason::MissingField, format!("no {key:?} field")));
                }
                Some(serde_json::Value::Array(a)) => a,
                Some(other) => {
                    return Err(err(Reason::WrongType, format!("{key:?} is {}, not a list", json_type(other))));
                }
            };
            let mut parts = Vec::with_capacity(list.len());
            for (pi, p) in list.iter().enumerate() {
                parts.push(interleaved_part(p, base).map_err(|(r, e)| err(r, format!("part {pi}: {e}")))?);
            }
            if parts.is_empty() {
                return Err(err(Reason::Empty, format!("{key:?} is an empty list")));
            }
            parts
        }
    };
    Ok(RawRecord { file: file.clone(), index, byte_offset: Some(offset), parts })
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// An image/audio reference in JSON: a path string (relative to the JSONL file) or `{"path": ...}`.
fn json_blob(v: &serde_json::Value, base: &Path) -> Result<Blob, String> {
    let path = match v {
        serde_json::Value::String(s) => s.as_str(),
        serde_json::Value::Object(o) => match o.get("path") {
            Some(serde_json::Value::String(s)) => s.as_str(),
            _ => return Err("object without a string \"path\"".into()),
        },
        other => return Err(format!("is {}, not a path", json_type(other))),
    };
    if path.is_empty() {
        return Err("empty path".into());
    }
    let p = Path::new(path);
    Ok(Blob::Path { path: if p.is_absolute() { p.to_path_buf() } else { base.join(p) }, name: path.to_string() })
}

/// One entry of an interleaved `parts` list: `{"text": ...}`, `{"image": path}` or `{"audio": path}`.
fn interleaved_part(v: &serde_json::Value, base: &Path) -> Result<RawPart, (Reason, String)> {
    let serde_json::Value::Object(o) = v else {
        return Err((Reason::WrongType, format!("is {}, not an object", json_type(v))));
    };
    if o.len() != 1 {
        return Err((Reason::WrongType, "must have exactly one of \"text\", \"image\", \"audio\"".into()));
    }
    let (k, val) = o.iter().next().ok_or((Reason::WrongType, "empty object".to_string()))?;
    match k.as_str() {
        "text" => match val {
            serde_json::Value::String(s) if !s.trim().is_empty() => Ok(RawPart::Text(s.clone())),
            serde_json::Value::String(_) => Err((Reason::Empty, "empty text".into())),
            other => Err((Reason::WrongType, format!("text is {}", json_type(other)))),
        },
        "image" => json_blob(val, base).map(RawPart::Image).map_err(|e| (Reason::WrongType, format!("image {e}"))),
        "audio" | "speech" => {
            json_blob(val, base).map(RawPart::Audio).map_err(|e| (Reason::WrongType, format!("audio {e}")))
        }
        other => Err((Reason::WrongType, format!("unknown part kind {other:?}"))),
    }
}

/// A Parquet/Arrow string column normalised to `LargeUtf8`, or binary that should hold UTF-8.
pub(crate) enum TextColumn {
    Str(LargeStringArray),
    Bin(LargeBinaryArray),
}

impl TextColumn {
    pub(crate) fn from_array(a: &ArrayRef) -> Result<TextColumn, String> {
        if is_string_type(a.data_type()) {
            let c = arrow::compute::cast(a, &DataType::LargeUtf8).map_err(|e| e.to_string())?;
            let s = c.as_string_opt::<i64>().ok_or("cast to large string failed")?;
            Ok(TextColumn::Str(s.clone()))
        } else if is_binary_type(a.data_type()) {
            let c = arrow::compute::cast(a, &DataType::LargeBinary).map_err(|e| e.to_string())?;
            let b = c.as_binary_opt::<i64>().ok_or("cast to large binary failed")?;
            Ok(TextColumn::Bin(b.clone()))
        } else {
            Err(format!("has type {}, not text", a.data_type()))
        }
    }

    /// Row `i`: Ok(None) when null.
    pub(crate) fn get(&self, i: usize) -> Result<Option<&str>, String> {
        match self {
            TextColumn::Str(s) => Ok(s.is_valid(i).then(|| s.value(i))),
            TextColumn::Bin(b) => {
                if !b.is_valid(i) {
                    return Ok(None);
                }
                std::str::from_utf8(b.value(i))
                    .map(Some)
                    .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))
            }
        }
    }
}

pub(crate) fn is_string_type(t: &DataType) -> bool {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => is_string_type(v),
        _ => false,
    }
}

pub(crate) fn is_binary_type(t: &DataType) -> bool {
    match t {
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => true,
        DataType::Dictionary(_, v) => is_binary_type(v),
        _ => false,
    }
}

/// A Parquet image/audio column: raw bytes, paths, or a Hugging Face `{bytes, path}` struct.
pub(crate) struct BlobColumn {
    bytes: Option<LargeBinaryArray>,
    paths: Option<TextColumn>,
    /// Validity of the struct itself (HF: a null image).
    outer: Option<ArrayRef>,
}

impl BlobColumn {
    pub(crate) fn from_array(a: &ArrayRef) -> Result<BlobColumn, String> {
        let t = a.data_type();
        if is_binary_type(t) {
            let c = arrow::compute::cast(a, &DataType::LargeBinary).map_err(|e| e.to_string())?;
            let b = c.as_binary_opt::<i64>().ok_or("cast to large binary failed")?.clone();
            return Ok(BlobColumn { bytes: Some(b), paths: None, outer: None });
        }
        if is_string_type(t) {
            return Ok(BlobColumn { bytes: None, paths: Some(TextColumn::from_array(a)?), outer: None });
        }
        if let Some(s) = a.as_struct_opt() {
            let bytes = match s.column_by_name("bytes") {
                Some(c) if is_binary_type(c.data_type()) => {
                    let c = arrow::compute::cast(c, &DataType::LargeBinary).map_err(|e| e.to_string())?;
                    Some(c.as_binary_opt::<i64>().ok_or("cast to large binary failed")?.clone())
                }
                Some(c) => return Err(format!("field \"bytes\" has type {}", c.data_type())),
                None => None,
            };
            let paths = match s.column_by_name("path") {
                Some(c) => Some(TextColumn::from_array(c).map_err(|e| format!("field \"path\" {e}"))?),
                None => None,
            };
            if bytes.is_none() && paths.is_none() {
                return Err("struct without \"bytes\" or \"path\" fields".into());
            }
            return Ok(BlobColumn { bytes, paths, outer: Some(a.clone()) });
        }
        Err(format!("has type {t}, not bytes, a path or a {{bytes, path}} struct"))
    }

    /// Row `i` as a blob; Ok(None) when null. Paths are relative to `base`.
    pub(crate) fn get(&self, i: usize, base: &Path, name: &str) -> Result<Option<Blob>, String> {
        if self.outer.as_ref().is_some_and(|o| o.is_null(i)) {
            return Ok(None);
        }
        if let Some(b) = &self.bytes
            && b.is_valid(i)
            && !b.value(i).is_empty()
        {
            return Ok(Some(Blob::Bytes { data: b.value(i).to_vec(), name: name.to_string() }));
        }
        if let Some(p) = &self.paths
            && let Some(s) = p.get(i)?
            && !s.is_empty()
        {
            let p = Path::new(s);
            let path = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
            return Ok(Some(Blob::Path { path, name: s.to_string() }));
        }
        Ok(None)
    }
}

/// Reads a whole small file (used for sidecars and tests).
pub fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::RecipeOptions;

    fn collect(ctx: &ReadCtx<'_>, unit: &Unit) -> Vec<Item> {
        let mut out = Vec::new();
        let _ = read_unit(ctx, unit, &mut |i| {
            out.push(i);
            ControlFlow::Continue(())
        });
        out
    }

    fn unit(file: PathBuf, format: FileFormat) -> Unit {
        Unit { file, format, bytes: 0, row_groups: None, first_row: 0, remote: None }
    }

    #[test]
    fn jsonl_text_records_and_errors() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.jsonl");
        let mut data = b"{\"text\": \"hello\"}\n\n{\"text\": 3}\nnot json\n{\"other\": 1}\n{\"text\": \"\"}\n".to_vec();
        data.extend_from_slice(b"{\"text\": \"\xff\"}\n{\"text\": \"bye\"}");
        std::fs::write(&p, &data)?;
        let spec = SourceSpec::new(SourceKind::Text, vec![]);
        let options = RecipeOptions::default();
        let items = collect(&ReadCtx { spec: &spec, options: &options }, &unit(p, FileFormat::Jsonl));
        let reasons: Vec<_> = items.iter().map(|i| i.as_ref().err().map(|e| e.reason)).collect();
        assert_eq!(
            reasons,
            vec![
                None,
                Some(Reason::WrongType),
                Some(Reason::Json),
                Some(Reason::MissingField),
                Some(Reason::Empty),
                Some(Reason::InvalidUtf8),
                None
            ]
        );
        let last = items[6].as_ref().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!(last.index, 6);
        assert_eq!(last.parts, vec![RawPart::Text("bye".into())]);
        assert_eq!(items[1].as_ref().err().and_then(|e| e.byte_offset), Some(19));
        Ok(())
    }

    #[test]
    fn plain_text_is_chunked_at_lines() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "one\ntwo\n\nthree\nfour five six seven\nlast\n")?;
        let spec = SourceSpec::new(SourceKind::Text, vec![]);
        let options = RecipeOptions { max_text_bytes: 6, ..Default::default() };
        let items = collect(&ReadCtx { spec: &spec, options: &options }, &unit(p.clone(), FileFormat::PlainText));
        let texts: Vec<_> = items
            .iter()
            .filter_map(|i| match i.as_ref().ok()?.parts.first()? {
                RawPart::Text(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        // "four five six seven" is longer than twice max_text_bytes: cut after spaces past it.
        assert_eq!(texts, vec!["one\ntwo\n\n", "three\nfour ", "five six ", "seven\nlast\n"]);
        std::fs::write(&p, "")?;
        let items = collect(&ReadCtx { spec: &spec, options: &options }, &unit(p, FileFormat::PlainText));
        assert!(matches!(&items[..], [Err(RecordError { reason: Reason::Empty, .. })]));
        Ok(())
    }

    #[test]
    fn a_file_without_newlines_is_cut_at_max_text_bytes() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let spec = SourceSpec::new(SourceKind::Text, vec![]);
        let options = RecipeOptions { max_text_bytes: 100, ..Default::default() };
        let ctx = ReadCtx { spec: &spec, options: &options };
        let words: String = (0..400).map(|i| format!("w{i} ")).collect();
        // Words (cut after a space), then no spaces at all in two- and three-byte characters.
        let cases = [words.trim_end().to_string(), "é".repeat(700), "a€".repeat(300) + "end"];
        for text in cases {
            let p = dir.path().join("one-line.txt");
            std::fs::write(&p, &text)?;
            let items = collect(&ctx, &unit(p, FileFormat::PlainText));
            let mut joined = String::new();
            let mut expect_offset = 0u64;
            for (k, item) in items.iter().enumerate() {
                let r = item.as_ref().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let [RawPart::Text(t)] = &r.parts[..] else { anyhow::bail!("one text part") };
                assert!(t.len() <= 200, "document {k} of {} bytes past twice max_text_bytes", t.len());
                if k + 1 < items.len() {
                    assert!(t.len() >= 97, "document {k} of {} bytes", t.len());
                }
                assert_eq!(r.byte_offset, Some(expect_offset));
                expect_offset += t.len() as u64;
                joined.push_str(t);
            }
            assert!(items.len() >= text.len() / 200, "{} documents for {} bytes", items.len(), text.len());
            assert_eq!(joined, text, "the documents put together are the file");
        }
        Ok(())
    }

    #[test]
    fn interleaved_parts_resolve_relative_paths() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("i.jsonl");
        std::fs::write(
            &p,
            "{\"parts\": [{\"text\": \"a\"}, {\"image\": \"images/x.png\"}, {\"audio\": \"s/y.flac\"}]}\n{\"parts\": [{\"video\": \"v\"}]}\n{\"parts\": []}\n",
        )?;
        let spec = SourceSpec::new(SourceKind::Interleaved, vec![]);
        let options = RecipeOptions::default();
        let items = collect(&ReadCtx { spec: &spec, options: &options }, &unit(p, FileFormat::Jsonl));
        let first = items[0].as_ref().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!(
            first.parts,
            vec![
                RawPart::Text("a".into()),
                RawPart::Image(Blob::Path { path: dir.path().join("images/x.png"), name: "images/x.png".into() }),
                RawPart::Audio(Blob::Path { path: dir.path().join("s/y.flac"), name: "s/y.flac".into() })
            ]
        );
        assert!(matches!(&items[1], Err(RecordError { reason: Reason::WrongType, .. })));
        assert!(matches!(&items[2], Err(RecordError { reason: Reason::Empty, .. })));
        Ok(())
    }

    #[test]
    fn caption_order_follows_text_first() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("c.jsonl");
        let mut s = String::new();
        for i in 0..400 {
            s.push_str(&format!("{{\"image\": \"{i}.png\", \"caption\": \"c{i}\"}}\n"));
        }
        std::fs::write(&p, s)?;
        let spec = SourceSpec { text_first: Some(0.8), ..SourceSpec::new(SourceKind::Image, vec![]) };
        let options = RecipeOptions::default();
        let items = collect(&ReadCtx { spec: &spec, options: &options }, &unit(p.clone(), FileFormat::Jsonl));
        let first: usize =
            items.iter().filter(|i| matches!(i, Ok(r) if matches!(r.parts[0], RawPart::Text(_)))).count();
        assert!((280..=360).contains(&first), "caption first {first}/400 for p = 0.8");
        let again = collect(&ReadCtx { spec: &spec, options: &options }, &unit(p, FileFormat::Jsonl));
        assert_eq!(items, again);
        Ok(())
    }
}
