//! Object stores (`s3://…`, `gs://…`, `az://…`, `http(s)://…`): the hook through which the
//! `motley` binary (motley-remote) lists, fetches and writes objects, so this crate holds no
//! network code. Inputs: the plan lists a remote pattern's objects (names and sizes are all it
//! needs); a task fetches its objects into a local cache when it starts and deletes them when it
//! ends. Output (`IngestConfig::upload`): a finished task's shards are uploaded and deleted
//! here before its marker is written.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::plan::Unit;

/// Lists and fetches objects; registered once per process with [`set_input_store`].
pub trait InputStore: Send + Sync {
    /// The objects a location or glob names, as `(uri, bytes)` sorted by uri.
    fn list(&self, pattern: &str) -> std::result::Result<Vec<(String, u64)>, String>;
    /// Downloads `uri` (`size` bytes) to `dest`, whole or not at all.
    fn fetch(&self, uri: &str, size: u64, dest: &Path) -> std::result::Result<(), String>;
    /// The local folder fetched objects are kept in while their task runs.
    fn cache_dir(&self) -> PathBuf;
    /// Writes the file `local` as the object `uri`, whole or not at all.
    fn put(&self, local: &Path, uri: &str) -> std::result::Result<(), String>;
}

static STORE: OnceLock<Box<dyn InputStore>> = OnceLock::new();

/// Registers the process's object-store access; false if one was registered already.
pub fn set_input_store(store: impl InputStore + 'static) -> bool {
    STORE.set(Box::new(store)).is_ok()
}

/// Where a unit's bytes live when they are not on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteInput {
    pub uri: String,
    /// The object's size when the plan listed it.
    pub size: u64,
}

/// Whether a source path is an object-store location rather than a local path.
pub fn is_remote(pattern: &str) -> bool {
    motley_shards::store::is_remote(pattern)
}

fn store(uri: &str) -> Result<&'static dyn InputStore> {
    STORE.get().map(|b| b.as_ref()).ok_or_else(|| Error::Remote {
        uri: uri.to_string(),
        message: "object-store inputs need the `motley` binary (no object store is registered)".into(),
    })
}

/// The objects of a remote pattern with their local paths in the cache.
pub(crate) fn list(pattern: &str) -> Result<Vec<(PathBuf, RemoteInput)>> {
    let s = store(pattern)?;
    let listed =
        s.list(pattern).map_err(|e| Error::Remote { uri: pattern.to_string(), message: format!("listing: {e}") })?;
    let cache = s.cache_dir();
    Ok(listed.into_iter().map(|(uri, size)| (local_path(&cache, &uri), RemoteInput { uri, size })).collect())
}

/// `s3://bucket/a/b.tar` → `CACHE/s3/bucket/a/b.tar` (empty, `.` and `..` parts dropped, so a
/// name cannot point outside the cache).
pub(crate) fn local_path(cache: &Path, uri: &str) -> PathBuf {
    let (scheme, rest) = uri.split_once("://").unwrap_or(("remote", uri));
    let mut p = cache.join(scheme);
    for part in rest.split('/').filter(|s| !s.is_empty() && *s != "." && *s != "..") {
        p.push(part);
    }
    p
}

/// Makes `file` present when it is the local copy of `remote`: fetched unless a file of the
/// listed size is there. A local input (`None`) is left alone.
pub(crate) fn ensure_local(file: &Path, remote: Option<&RemoteInput>) -> Result<()> {
    let Some(r) = remote else { return Ok(()) };
    if std::fs::metadata(file).is_ok_and(|m| m.len() == r.size) {
        return Ok(());
    }
    store(&r.uri)?
        .fetch(&r.uri, r.size, file)
        .map_err(|e| Error::Remote { uri: r.uri.clone(), message: format!("fetching: {e}") })
}

/// The objects directly under the location `uri`, by name, with their sizes (what an
/// interrupted ingest already uploaded there).
pub(crate) fn uploaded(uri: &str) -> Result<std::collections::HashMap<String, u64>> {
    let s = store(uri)?;
    let base = uri.trim_end_matches('/');
    let listed = s.list(base).map_err(|e| Error::Remote { uri: uri.to_string(), message: format!("listing: {e}") })?;
    Ok(listed
        .into_iter()
        .filter_map(|(u, size)| {
            let name = u.strip_prefix(base)?.strip_prefix('/')?;
            (!name.contains('/')).then(|| (name.to_string(), size))
        })
        .collect())
}

/// Uploads a finished shard to `uri/name` and deletes the local file.
pub(crate) fn upload_shard(local: &Path, uri: &str, name: &str) -> Result<()> {
    let object = format!("{}/{name}", uri.trim_end_matches('/'));
    store(&object)?
        .put(local, &object)
        .map_err(|e| Error::Remote { uri: object.clone(), message: format!("uploading: {e}") })?;
    std::fs::remove_file(local).map_err(|e| Error::io("remove uploaded shard", local, e))
}

/// Deletes a remote unit's local copy once its task is done with it. A Parquet file split into
/// row-group tasks is shared by them and stays (the plan fetched it to read its footer).
pub(crate) fn release(unit: &Unit) {
    if unit.remote.is_some() && unit.row_groups.is_none() {
        let _ = std::fs::remove_file(&unit.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_stay_inside_the_cache() {
        let c = Path::new("/cache");
        assert_eq!(local_path(c, "s3://b/x/y.tar"), Path::new("/cache/s3/b/x/y.tar"));
        assert_eq!(local_path(c, "s3://b/../../etc/passwd"), Path::new("/cache/s3/b/etc/passwd"));
        assert_eq!(local_path(c, "https://h.org//a/./b"), Path::new("/cache/https/h.org/a/b"));
    }
}
