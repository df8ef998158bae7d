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

/// Runs `body` (a task reading its units in order) while up to `ahead` of the units after the
/// one being read are fetched in parallel, as long as they hold at most 1 GiB together (the
/// next one always goes). `body` gets `ready(i)`: waits until unit `i` is local (its fetch's
/// error if it failed) and tells the fetchers the reader is there. Units fetched but never read
/// (the task stopped early) are deleted. Local units pass straight through; `ahead = 0` fetches
/// each unit when the reader asks for it.
pub(crate) fn fetch_ahead<R>(units: &[Unit], ahead: usize, body: impl FnOnce(&dyn Fn(usize) -> Result<()>) -> R) -> R {
    const BUDGET: u64 = 1 << 30;
    if ahead == 0 || units.iter().all(|u| u.remote.is_none()) {
        return body(&|i| units.get(i).map_or(Ok(()), |u| ensure_local(&u.file, u.remote.as_ref())));
    }
    struct State {
        /// The next unit a fetcher takes, and the unit the reader is at.
        next: usize,
        reading: usize,
        results: Vec<Option<Result<()>>>,
        stop: bool,
    }
    let state = std::sync::Mutex::new(State {
        next: 0,
        reading: 0,
        results: (0..units.len()).map(|_| None).collect(),
        stop: false,
    });
    let changed = std::sync::Condvar::new();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let fetcher = || loop {
        let mut g = lock();
        let i = loop {
            if g.stop || g.next >= units.len() {
                return;
            }
            let (from, i) = (g.reading, g.next);
            let waiting: u64 = units[from.min(i)..i].iter().map(|u| u.bytes).sum();
            if i <= from + 1 || (i <= from + ahead && waiting + units[i].bytes <= BUDGET) {
                break i;
            }
            g = changed.wait(g).unwrap_or_else(|p| p.into_inner());
        };
        g.next += 1;
        drop(g);
        let r = ensure_local(&units[i].file, units[i].remote.as_ref());
        lock().results[i] = Some(r);
        changed.notify_all();
    };
    let ready = |i: usize| -> Result<()> {
        let mut g = lock();
        g.reading = g.reading.max(i);
        changed.notify_all();
        while i < units.len() {
            if let Some(r) = g.results[i].take() {
                return r;
            }
            g = changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    };
    let out = std::thread::scope(|s| {
        for _ in 0..ahead.min(units.len()) {
            s.spawn(fetcher);
        }
        let out = body(&ready);
        lock().stop = true;
        changed.notify_all();
        out
    });
    // Every fetch has ended: what the reader never reached goes.
    let g = lock();
    for u in units.iter().take(g.next).skip(g.reading + 1) {
        release(u);
    }
    out
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

    /// A store over a local folder whose fetches take a while and count how many overlap.
    struct SlowFolder {
        root: PathBuf,
        cache: PathBuf,
        now: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    impl InputStore for SlowFolder {
        fn list(&self, _: &str) -> std::result::Result<Vec<(String, u64)>, String> {
            Err("not listed here".into())
        }
        fn fetch(&self, uri: &str, _size: u64, dest: &Path) -> std::result::Result<(), String> {
            use std::sync::atomic::Ordering::SeqCst;
            let n = self.now.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(n, SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(30));
            let src = self.root.join(uri.trim_start_matches("s3://b/"));
            let r = std::fs::create_dir_all(dest.parent().unwrap_or(Path::new(".")))
                .and_then(|()| std::fs::copy(&src, dest).map(|_| ()))
                .map_err(|e| format!("{}: {e}", src.display()));
            self.now.fetch_sub(1, SeqCst);
            r
        }
        fn cache_dir(&self) -> PathBuf {
            self.cache.clone()
        }
        fn put(&self, _: &Path, _: &str) -> std::result::Result<(), String> {
            Err("read-only".into())
        }
    }

    /// Fetch-ahead: every unit is ready in order with its bytes, fetches overlap but never more
    /// than `ahead` at once, a failed fetch is that unit's error naming the object, and what
    /// a task stopping early never read is deleted.
    #[test]
    fn units_are_fetched_ahead_in_parallel_bounded_and_cleaned_up() {
        use std::sync::atomic::Ordering::SeqCst;
        let tmp = tempfile::tempdir().expect("tmp");
        let (root, cache) = (tmp.path().join("bucket"), tmp.path().join("cache"));
        std::fs::create_dir_all(&root).expect("mkdir");
        let store = Box::leak(Box::new(SlowFolder {
            root: root.clone(),
            cache: cache.clone(),
            now: Default::default(),
            most: Default::default(),
        }));
        assert!(set_input_store(StoreRef(store)), "a store was registered already");
        let units: Vec<Unit> = (0..12)
            .map(|i| {
                let name = format!("o{i:02}.txt");
                if i != 9 {
                    std::fs::write(root.join(&name), format!("object {i}")).expect("write");
                }
                let uri = format!("s3://b/{name}");
                Unit {
                    file: local_path(&cache, &uri),
                    format: crate::plan::FileFormat::PlainText,
                    bytes: 9,
                    row_groups: None,
                    first_row: 0,
                    remote: Some(RemoteInput { uri, size: 9 }),
                }
            })
            .collect();
        // Read 0..9 in order; unit 9 fails; the task stops there.
        let read = fetch_ahead(&units, 3, |ready| {
            let mut read = Vec::new();
            for (i, u) in units.iter().enumerate() {
                match ready(i) {
                    Ok(()) => {
                        read.push(std::fs::read_to_string(&u.file).expect("fetched"));
                        release(u);
                    }
                    Err(e) => {
                        assert!(e.to_string().contains("s3://b/o09.txt"), "{e}");
                        break;
                    }
                }
            }
            read
        });
        assert_eq!(read, (0..9).map(|i| format!("object {i}")).collect::<Vec<_>>());
        let most = store.most.load(SeqCst);
        assert!((2..=3).contains(&most), "{most} fetches at once");
        let left: Vec<_> =
            std::fs::read_dir(cache.join("s3/b")).expect("cache").flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// `&'static SlowFolder` as a registrable store.
    struct StoreRef(&'static SlowFolder);

    impl InputStore for StoreRef {
        fn list(&self, p: &str) -> std::result::Result<Vec<(String, u64)>, String> {
            self.0.list(p)
        }
        fn fetch(&self, uri: &str, size: u64, dest: &Path) -> std::result::Result<(), String> {
            self.0.fetch(uri, size, dest)
        }
        fn cache_dir(&self) -> PathBuf {
            self.0.cache_dir()
        }
        fn put(&self, l: &Path, u: &str) -> std::result::Result<(), String> {
            self.0.put(l, u)
        }
    }

    #[test]
    fn cache_paths_stay_inside_the_cache() {
        let c = Path::new("/cache");
        assert_eq!(local_path(c, "s3://b/x/y.tar"), Path::new("/cache/s3/b/x/y.tar"));
        assert_eq!(local_path(c, "s3://b/../../etc/passwd"), Path::new("/cache/s3/b/etc/passwd"));
        assert_eq!(local_path(c, "https://h.org//a/./b"), Path::new("/cache/https/h.org/a/b"));
    }
}
