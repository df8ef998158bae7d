//! Single objects in object stores: the objects a location or glob names (`s3://b/laion/*.tar`),
//! each fetched to a local file (ingest inputs, a mirrored run's checkpoint), written from
//! bytes or streamed from a file, and deleted.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::{
    RemoteError, RemoteOptions, Result, backoff, block, for_each_range, io, outer_retries, parse_location, put,
    transient,
};

/// Splits `s3://b/data/shard-*.tar` into the location before the first path segment holding a
/// glob character (`s3://b/data`) and the pattern relative to it (`shard-*.tar`; empty: none).
fn split_glob(pattern: &str) -> (String, String) {
    let Some(g) = pattern.find(['*', '?', '[']) else {
        return (pattern.trim_end_matches('/').to_string(), String::new());
    };
    let cut = pattern[..g].rfind('/').unwrap_or(0);
    (pattern[..cut].to_string(), pattern[cut + 1..].to_string())
}

/// The objects `pattern` names, as `(uri, bytes)` sorted by uri: every object under a location
/// (a "directory"; names starting with `.` are skipped, as a local walk skips them), the object
/// itself when the location is one, or the objects whose path below the location matches a
/// glob (`*` and `?` do not cross `/`, as in a shell).
pub fn list_inputs(pattern: &str, opts: &RemoteOptions) -> Result<Vec<(String, u64)>> {
    let (base, glob) = split_glob(pattern);
    let bad = |detail: String| RemoteError::Location { uri: pattern.to_string(), detail };
    let matcher = if glob.is_empty() {
        None
    } else {
        Some(glob::Pattern::new(&glob).map_err(|e| bad(format!("glob {glob:?}: {e}")))?)
    };
    let (store, prefix) = parse_location(&base, opts)?;
    let (s, p) = (store.clone(), prefix.clone());
    let listed = match block(async move { s.list(Some(&p)).try_collect::<Vec<_>>().await }) {
        Ok(l) => l,
        // A plain HTTP server cannot list (object_store lists over WebDAV): one named object
        // still works.
        Err(source) => {
            let (s, p) = (store.clone(), prefix.clone());
            return match block(async move { s.head(&p).await }) {
                Ok(meta) if matcher.is_none() => Ok(vec![(base.clone(), meta.size)]),
                _ => Err(RemoteError::Object { object: base.clone(), op: "LIST", attempts: 1, source }),
            };
        }
    };
    let options = glob::MatchOptions { require_literal_separator: true, ..Default::default() };
    let mut out = Vec::new();
    for meta in listed {
        let rel = match meta.location.prefix_match(&prefix) {
            Some(parts) => parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"),
            None => continue,
        };
        let keep = match &matcher {
            Some(m) => m.matches_with(&rel, options),
            None => !rel.split('/').any(|part| part.starts_with('.')),
        };
        if keep {
            let uri = if rel.is_empty() { base.clone() } else { format!("{}/{rel}", base.trim_end_matches('/')) };
            out.push((uri, meta.size));
        }
    }
    if out.is_empty() && matcher.is_none() {
        // Not a "directory": the location may be one object.
        let (s, p) = (store.clone(), prefix.clone());
        if let Ok(meta) = block(async move { s.head(&p).await }) {
            out.push((base.clone(), meta.size));
        }
    }
    out.sort();
    Ok(out)
}

/// Downloads the object `uri` (`size` bytes, as listed) to `dest`: range reads, each retried,
/// written to a temporary file beside `dest` and renamed into place, so `dest` is whole or
/// absent.
pub fn fetch_input(uri: &str, size: u64, dest: &Path, opts: &RemoteOptions) -> Result<()> {
    let (store, path): (Arc<dyn ObjectStore>, ObjPath) = parse_location(uri, opts)?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, "create", e))?;
    }
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Unique per call: two threads of this process may fetch the same object at once.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dest.with_file_name(format!(".{name}.part-{}-{n}", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(|e| io(&tmp, "create", e))?;
    // Ranges arrive in any order (several in flight): each is written at its offset.
    // for_each_range fetches every byte of 0..size or fails (a short range is an error).
    let r = file.set_len(size).map_err(|e| io(&tmp, "size", e)).and_then(|()| {
        for_each_range(&store, &path, uri, size, opts, &|at, b| {
            file.write_all_at(b, at).map_err(|e| io(&tmp, "write", e))
        })
    });
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dest).map_err(|e| io(dest, "rename", e))
}

/// Writes `bytes` as the object `uri` (multipart past 64 MiB), retrying transient errors.
pub fn put_object(uri: &str, bytes: Vec<u8>, opts: &RemoteOptions) -> Result<()> {
    let (store, path) = parse_location(uri, opts)?;
    put(&store, &path, uri, bytes, opts)
}

/// Writes the file `local` as the object `uri`: one PUT up to 64 MiB, past that a multipart
/// upload streamed from the file in 16 MiB parts (memory: a few parts, whatever the file's
/// size), retrying transient errors from the start. The object appears whole or not at all.
pub fn put_file(uri: &str, local: &Path, opts: &RemoteOptions) -> Result<()> {
    let (store, path) = parse_location(uri, opts)?;
    put_file_at(&store, &path, uri, local, opts)
}

pub(crate) fn put_file_at(
    store: &Arc<dyn ObjectStore>,
    path: &ObjPath,
    object: &str,
    local: &Path,
    opts: &RemoteOptions,
) -> Result<()> {
    const PART: usize = 16 << 20;
    let size = std::fs::metadata(local).map_err(|e| io(local, "read", e))?.len();
    if size <= 64 << 20 {
        let bytes = std::fs::read(local).map_err(|e| io(local, "read", e))?;
        return put(store, path, object, bytes, opts);
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (s, p, file) = (store.clone(), path.clone(), local.to_path_buf());
        // A read error ends the upload (aborted) and is reported as the file's, not retried.
        let r: std::result::Result<(), std::result::Result<std::io::Error, object_store::Error>> = block(async move {
            let upload = s.put_multipart(&p).await.map_err(Err)?;
            let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
            let mut f = std::fs::File::open(&file).map_err(Ok)?;
            let mut buf = vec![0u8; PART];
            loop {
                w.wait_for_capacity(4).await.map_err(Err)?;
                let n = match read_full(&mut f, &mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = w.abort().await;
                        return Err(Ok(e));
                    }
                };
                if n == 0 {
                    break;
                }
                w.write(&buf[..n]);
            }
            w.finish().await.map(|_| ()).map_err(Err)
        });
        match r {
            Ok(()) => return Ok(()),
            Err(Ok(e)) => return Err(io(local, "read", e)),
            Err(Err(e)) if transient(&e) && attempt <= outer_retries(opts) => {
                tracing::warn!("{object}: {e}; retrying the upload");
                std::thread::sleep(backoff(opts, attempt));
            }
            Err(Err(source)) => {
                return Err(RemoteError::Object { object: object.to_string(), op: "PUT", attempts: attempt, source });
            }
        }
    }
}

/// Reads until `buf` is full or the file ends; the bytes read.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Deletes the object `uri`; an object that is already gone is not an error.
pub fn delete_object(uri: &str, opts: &RemoteOptions) -> Result<()> {
    let (store, path) = parse_location(uri, opts)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (s, p) = (store.clone(), path.clone());
        match block(async move { s.delete(&p).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) if transient(&e) && attempt <= outer_retries(opts) => {
                tracing::warn!("{uri}: {e}; retrying");
                std::thread::sleep(backoff(opts, attempt));
            }
            Err(source) => {
                return Err(RemoteError::Object { object: uri.to_string(), op: "DELETE", attempts: attempt, source });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_split_at_the_segment_that_holds_them() {
        let s = |p: &str| split_glob(p);
        assert_eq!(s("s3://b/data/shard-*.tar"), ("s3://b/data".into(), "shard-*.tar".into()));
        assert_eq!(s("s3://b/data/*/x?.tar"), ("s3://b/data".into(), "*/x?.tar".into()));
        assert_eq!(s("s3://b/data/"), ("s3://b/data".into(), String::new()));
        assert_eq!(s("gs://b/a/b/c.parquet"), ("gs://b/a/b/c.parquet".into(), String::new()));
    }
}
