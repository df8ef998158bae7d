//! Deterministic input planning: expand paths and globs per source, group files into tasks,
//! split large Parquet files by row groups, and pick this machine's share with `--part i/N`.
//!
//! The plan depends only on the recipe and on the input files' names and sizes, so a re-run
//! (or another machine) computes the same task ids: that is what makes resume and
//! multi-machine ingest exact.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::recipe::{Recipe, SourceKind};

/// How one input file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// A whole text file (split at line boundaries past `max_text_bytes`).
    PlainText,
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet.
    Parquet,
    /// One image file (caption from a sidecar `.txt` with the same stem, if any).
    ImageFile,
    /// One audio file (transcript from a sidecar `.txt`, if any).
    AudioFile,
    /// A WebDataset shard: a tar whose members sharing a key form one sample.
    #[serde(rename = "webdataset")]
    WebDataset,
}

pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"];
pub const AUDIO_EXTENSIONS: &[&str] = &["wav", "flac", "mp3", "ogg", "oga", "opus"];

fn ext_of(path: &Path) -> String {
    path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default()
}

/// `*.tar.gz` or `*.tgz`: a gzip-compressed WebDataset shard.
pub fn is_gzipped_tar(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// The format of `path` inside a source of `kind`; `explicit` is true when the user named the
/// file itself (then an image source reads it as an image whatever its extension).
pub fn detect_format(kind: SourceKind, path: &Path, explicit: bool) -> Option<FileFormat> {
    let ext = ext_of(path);
    if is_gzipped_tar(path) {
        return Some(FileFormat::WebDataset);
    }
    match ext.as_str() {
        "jsonl" | "ndjson" | "json" => return Some(FileFormat::Jsonl),
        "parquet" | "pq" => return Some(FileFormat::Parquet),
        "tar" => return Some(FileFormat::WebDataset),
        _ => {}
    }
    match kind {
        SourceKind::Text => Some(FileFormat::PlainText),
        SourceKind::Image => {
            (explicit && ext != "txt" || IMAGE_EXTENSIONS.contains(&ext.as_str())).then_some(FileFormat::ImageFile)
        }
        SourceKind::Speech => {
            (explicit && ext != "txt" || AUDIO_EXTENSIONS.contains(&ext.as_str())).then_some(FileFormat::AudioFile)
        }
        SourceKind::Interleaved => None,
    }
}

/// A piece of one input file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    pub file: PathBuf,
    pub format: FileFormat,
    /// Bytes of the file (or of the row groups) this unit covers.
    pub bytes: u64,
    /// Parquet row groups `[start, end)`; None = the whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_groups: Option<(usize, usize)>,
    /// Index of the first row of `row_groups` in the file (record numbers stay file-global).
    #[serde(default)]
    pub first_row: u64,
    /// The object `file` is fetched from, for an input in an object store (`file` is then its
    /// place in the local cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<crate::remote_input::RemoteInput>,
}

/// A unit of work: consecutive units of one source, written as the shards `task-NNNNN-*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Global task id (the same on every machine and every re-run).
    pub id: u32,
    pub source: usize,
    pub units: Vec<Unit>,
}

impl Task {
    pub fn bytes(&self) -> u64 {
        self.units.iter().map(|u| u.bytes).sum()
    }

    /// The shard name prefix of this task (`task-00017`).
    pub fn name(&self) -> String {
        format!("task-{:05}", self.id)
    }
}

/// `--part i/N`: this machine ingests part `index` of `count` (0-based index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub index: u32,
    pub count: u32,
}

impl Default for Part {
    fn default() -> Self {
        Part { index: 0, count: 1 }
    }
}

impl std::str::FromStr for Part {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (i, n) = s.split_once('/').ok_or_else(|| format!("--part {s:?}: expected i/N, e.g. 0/4"))?;
        let index: u32 = i.trim().parse().map_err(|_| format!("--part {s:?}: {i:?} is not a number"))?;
        let count: u32 = n.trim().parse().map_err(|_| format!("--part {s:?}: {n:?} is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("--part {s:?}: need 0 <= i < N"));
        }
        Ok(Part { index, count })
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// One input file of a source: where it is read from, how, and the object it is fetched from.
type Input = (PathBuf, FileFormat, Option<crate::remote_input::RemoteInput>);

/// Expands an object-store location or glob into its objects. They are fetched only when their
/// task runs, so a source may only name files that hold their records whole: media files
/// named from a JSONL, or sidecar captions, would not be fetched with them.
fn expand_remote(kind: SourceKind, pattern: &str) -> Result<Vec<Input>> {
    let mut out = Vec::new();
    for (local, remote) in crate::remote_input::list(pattern)? {
        let Some(format) = detect_format(kind, Path::new(&remote.uri), false) else { continue };
        let ok = match kind {
            SourceKind::Text => format != FileFormat::ImageFile && format != FileFormat::AudioFile,
            SourceKind::Image | SourceKind::Speech => matches!(format, FileFormat::WebDataset | FileFormat::Parquet),
            SourceKind::Interleaved => false,
        };
        if !ok {
            let takes = match kind {
                SourceKind::Text => "an object store's inputs as text files, JSONL, Parquet or WebDataset tars",
                SourceKind::Image | SourceKind::Speech => "an object store's inputs as WebDataset tars or Parquet",
                SourceKind::Interleaved => "no inputs from an object store",
            };
            return Err(Error::Remote {
                uri: remote.uri.clone(),
                message: format!(
                    "{} source reads {takes} (a {format:?} input names other files, which would not be fetched with it)",
                    match kind {
                        SourceKind::Text => "a text",
                        SourceKind::Image => "an image",
                        SourceKind::Speech => "a speech",
                        SourceKind::Interleaved => "an interleaved",
                    }
                ),
            });
        }
        out.push((local, format, Some(remote)));
    }
    Ok(out)
}

/// Expands one path / directory / glob into sorted files of a source.
fn expand(kind: SourceKind, pattern: &str) -> Result<Vec<Input>> {
    if crate::remote_input::is_remote(pattern) {
        return expand_remote(kind, pattern);
    }
    let local = expand_local(kind, pattern)?;
    Ok(local.into_iter().map(|(p, f)| (p, f, None)).collect())
}

/// [`expand`] of a local path.
fn expand_local(kind: SourceKind, pattern: &str) -> Result<Vec<(PathBuf, FileFormat)>> {
    let path = Path::new(pattern);
    let mut out = Vec::new();
    let is_glob = pattern.contains(['*', '?', '[']);
    if !is_glob && path.is_file() {
        if let Some(f) = detect_format(kind, path, true) {
            out.push((path.to_path_buf(), f));
        }
        return Ok(out);
    }
    if !is_glob && path.is_dir() {
        let mut files = Vec::new();
        walk(path, &mut files).map_err(|e| Error::io("list directory", path, e))?;
        files.sort();
        out.extend(files.into_iter().filter_map(|p| detect_format(kind, &p, false).map(|f| (p, f))));
        return Ok(out);
    }
    if !is_glob {
        // A plain path that does not exist: an error now beats an empty corpus later.
        return Err(Error::io("open input", path, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    let entries =
        glob::glob(pattern).map_err(|e| Error::Glob { pattern: pattern.to_string(), message: e.to_string() })?;
    let mut files = Vec::new();
    for entry in entries {
        let p = entry.map_err(|e| Error::io("glob", e.path().to_path_buf(), std::io::Error::other(e.to_string())))?;
        if p.is_dir() {
            walk(&p, &mut files).map_err(|e| Error::io("list directory", &p, e))?;
        } else {
            files.push(p);
        }
    }
    files.sort();
    out.extend(files.into_iter().filter_map(|p| detect_format(kind, &p, false).map(|f| (p, f))));
    Ok(out)
}

/// Recursive directory listing; hidden entries (dot files) are skipped.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let p = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// Row-group sizes of a Parquet file (compressed bytes, rows), read from its footer only.
fn parquet_row_groups(path: &Path) -> Result<Vec<(u64, u64)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let reader = crate::parquet_source::guarded("reading the footer", || SerializedFileReader::new(file))
        .map_err(|message| Error::Parquet { path: path.to_path_buf(), message })?;
    Ok(reader
        .metadata()
        .row_groups()
        .iter()
        .map(|rg| (rg.compressed_size().max(0) as u64, rg.num_rows().max(0) as u64))
        .collect())
}

/// The full, deterministic task list of a recipe (all parts).
pub fn plan(recipe: &Recipe) -> Result<Vec<Task>> {
    let target = ((recipe.options.task_mib * (1u64 << 20) as f64) as u64).max(1);
    let mut tasks: Vec<Task> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (si, source) in recipe.sources.iter().enumerate() {
        let mut files = Vec::new();
        for pattern in &source.paths {
            for (p, f, remote) in expand(source.kind, pattern)? {
                if seen.insert((si, p.clone())) {
                    files.push((p, f, remote));
                }
            }
        }
        if files.is_empty() {
            return Err(Error::NoInputs { source_name: source.display_name(si), patterns: source.paths.clone() });
        }
        let mut open: Vec<Unit> = Vec::new();
        let mut open_bytes = 0u64;
        let flush = |open: &mut Vec<Unit>, open_bytes: &mut u64, tasks: &mut Vec<Task>| {
            if !open.is_empty() {
                tasks.push(Task { id: tasks.len() as u32, source: si, units: std::mem::take(open) });
                *open_bytes = 0;
            }
        };
        for (file, format, remote) in files {
            let bytes = match &remote {
                Some(r) => r.size,
                None => std::fs::metadata(&file).map_err(|e| Error::io("stat", &file, e))?.len(),
            };
            if format == FileFormat::Parquet && bytes > target {
                // Big Parquet files: tasks of consecutive row groups of about `target` bytes.
                flush(&mut open, &mut open_bytes, &mut tasks);
                // The footer is read from a local copy; the row-group tasks share it.
                crate::remote_input::ensure_local(&file, remote.as_ref())?;
                let groups = parquet_row_groups(&file)?;
                let (mut start, mut acc, mut first_row, mut rows_before) = (0usize, 0u64, 0u64, 0u64);
                for (g, (size, rows)) in groups.iter().enumerate() {
                    acc += size;
                    rows_before += rows;
                    if acc >= target || g + 1 == groups.len() {
                        let unit = Unit {
                            file: file.clone(),
                            format,
                            bytes: acc,
                            row_groups: Some((start, g + 1)),
                            first_row,
                            remote: remote.clone(),
                        };
                        tasks.push(Task { id: tasks.len() as u32, source: si, units: vec![unit] });
                        start = g + 1;
                        acc = 0;
                        first_row = rows_before;
                    }
                }
                continue;
            }
            if open_bytes + bytes > target || open.len() >= recipe.options.task_files {
                flush(&mut open, &mut open_bytes, &mut tasks);
            }
            open_bytes += bytes;
            open.push(Unit { file, format, bytes, row_groups: None, first_row: 0, remote });
        }
        flush(&mut open, &mut open_bytes, &mut tasks);
    }
    Ok(tasks)
}

/// The tasks of `part`: a contiguous run of task ids balanced by bytes, so concatenating the
/// parts in order gives the single-machine corpus.
pub fn select_part(tasks: &[Task], part: Part) -> Vec<Task> {
    if part.count <= 1 {
        return tasks.to_vec();
    }
    let total: u128 = tasks.iter().map(|t| t.bytes().max(1) as u128).sum();
    let mut before: u128 = 0;
    let mut out = Vec::new();
    for t in tasks {
        let size = t.bytes().max(1) as u128;
        // Assign by the task's midpoint: every task lands in exactly one part.
        let mid2 = before * 2 + size;
        let p = ((mid2 * part.count as u128) / (total * 2)).min(part.count as u128 - 1) as u32;
        if p == part.index {
            out.push(t.clone());
        }
        before += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::SourceSpec;

    fn recipe(sources: Vec<SourceSpec>) -> Recipe {
        Recipe { tokenizers: Default::default(), options: Default::default(), sources }
    }

    #[test]
    fn plans_are_deterministic_and_grouped() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for i in 0..5 {
            std::fs::write(dir.path().join(format!("{i}.txt")), "hello world")?;
        }
        std::fs::write(dir.path().join("a.png"), b"x")?;
        std::fs::write(dir.path().join("a.txt.bak"), b"x")?;
        let glob = format!("{}/*.txt", dir.path().display());
        let mut r = recipe(vec![SourceSpec::new(SourceKind::Text, vec![glob.clone(), glob])]);
        let a = plan(&r)?;
        assert_eq!(a.len(), 1, "small files share a task");
        assert_eq!(a[0].units.len(), 5, "a file matched twice is read once");
        r.options.task_mib = 1.0;
        assert_eq!(plan(&r)?, a);
        r.options.task_files = 2;
        assert_eq!(plan(&r)?.iter().map(|t| t.units.len()).collect::<Vec<_>>(), vec![2, 2, 1]);
        // Image sources walking a directory only take images.
        let r = recipe(vec![SourceSpec::new(SourceKind::Image, vec![dir.path().display().to_string()])]);
        let t = plan(&r)?;
        assert_eq!(t[0].units.len(), 1);
        assert_eq!(t[0].units[0].format, FileFormat::ImageFile);
        Ok(())
    }

    #[test]
    fn missing_inputs_are_errors() {
        let r = recipe(vec![SourceSpec::new(SourceKind::Text, vec!["/nonexistent/motley/x.txt".into()])]);
        assert!(plan(&r).is_err());
        let r = recipe(vec![SourceSpec::new(SourceKind::Text, vec!["/nonexistent/motley/*.txt".into()])]);
        assert!(matches!(plan(&r), Err(Error::NoInputs { .. })));
    }

    #[test]
    fn parts_cover_every_task_once_in_order() {
        let tasks: Vec<Task> = (0..37)
            .map(|i| Task {
                id: i,
                source: 0,
                units: vec![Unit {
                    file: format!("f{i}").into(),
                    format: FileFormat::PlainText,
                    bytes: (i as u64 * 7919) % 1000,
                    row_groups: None,
                    first_row: 0,
                    remote: None,
                }],
            })
            .collect();
        for n in 1..6 {
            let mut all = Vec::new();
            for i in 0..n {
                let part = select_part(&tasks, Part { index: i, count: n });
                all.extend(part.into_iter().map(|t| t.id));
            }
            assert_eq!(all, (0..37).collect::<Vec<_>>(), "parts of {n}");
        }
        assert_eq!("2/4".parse::<Part>(), Ok(Part { index: 2, count: 4 }));
        assert!("4/4".parse::<Part>().is_err());
        assert!("x".parse::<Part>().is_err());
    }
}
