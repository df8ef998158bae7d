//! motley-remote: shard corpora in object stores — `s3://`, `gs://`, `az://`, `http(s)://` —
//! through Apache Arrow's `object_store` (and single objects: ingest inputs, mirrored training runs: `objects.rs`). Reading: the manifest is fetched first, then each
//! shard into a bounded local cache when the loader first needs it or is about to (a fetch-ahead
//! thread follows the loader's hints), checked against the manifest's size and blake3 on
//! arrival, retried with backoff on transient errors; released shards are evicted least
//! recently used first. Writing: shards are uploaded first, the manifest last, so a reader never
//! sees a manifest naming a missing shard.
//!
//! Credentials come from each cloud's usual sources as `object_store` reads them: `AWS_*`
//! variables (and instance / web-identity / container credentials), `GOOGLE_*` variables and
//! application-default credentials files, `AZURE_*` variables and the Azure CLI.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use motley_shards::store::ShardStore;
use motley_shards::writer::ShardStats;
use motley_shards::{Corpus, MANIFEST_NAME, Manifest, ShardError};
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

mod objects;
pub use objects::{delete_object, fetch_input, list_inputs, put_file, put_object};

/// The one error type of this crate: every variant names the object or file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    #[error("{uri}: not an object store location: {detail}")]
    Location { uri: String, detail: String },
    #[error("{object}: {op} failed after {attempts} attempt(s): {source}")]
    Object {
        object: String,
        op: &'static str,
        attempts: usize,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "{object}: checksum mismatch: the manifest says {expected_bytes} bytes with blake3 {expected}, the fetched object has {actual_bytes} bytes with blake3 {actual}"
    )]
    Checksum { object: String, expected: String, actual: String, expected_bytes: u64, actual_bytes: u64 },
    #[error("{op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Shards(#[from] ShardError),
}

impl From<RemoteError> for ShardError {
    fn from(e: RemoteError) -> ShardError {
        match e {
            RemoteError::Shards(e) => e,
            RemoteError::Checksum { object, expected, actual, .. } => {
                ShardError::Checksum { path: object.into(), what: "object blake3", offset: 0, expected, actual }
            }
            RemoteError::Object { object, op, attempts, source } => {
                ShardError::Remote { object, detail: format!("{op} failed after {attempts} attempt(s): {source}") }
            }
            RemoteError::Location { uri, detail } => {
                ShardError::Remote { object: uri, detail: format!("not an object store location: {detail}") }
            }
            RemoteError::Io { ref path, .. } => {
                ShardError::Remote { object: path.display().to_string(), detail: e.to_string() }
            }
        }
    }
}

pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

/// How remote corpora are cached and fetched.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Local cache root (a folder per corpus inside); None: `$MOTLEY_CACHE/remote`, else
    /// `~/.cache/motley/remote`.
    pub cache_dir: Option<PathBuf>,
    /// Bytes of shard files the cache keeps (released shards are evicted past it; shards in
    /// use never are). 0: no limit.
    pub cache_limit: u64,
    /// Retries of a request (object_store's) and of a whole download, on transient errors.
    pub retries: usize,
    /// First backoff; it doubles up to 5 s.
    pub backoff: Duration,
    /// Shards fetched ahead of the loader.
    pub prefetch: usize,
    /// Shards are fetched as range reads of at most this many bytes each, every one retried
    /// on its own (a failure resumes at that range, not at byte 0).
    pub range_bytes: u64,
    /// Range reads of one object in flight at once (one object store connection each): a
    /// single stream runs at one connection's rate (tens of MB/s to S3), so a large shard or
    /// checkpoint file is fetched as this many concurrent ranges. 1: one after another.
    pub range_streams: usize,
    /// Extra configuration of the store, as `object_store` names it (`aws_endpoint`,
    /// `aws_allow_http`, `google_service_account`, …), applied after the environment's.
    pub config: Vec<(String, String)>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            cache_dir: None,
            cache_limit: 32 << 30,
            retries: 5,
            backoff: Duration::from_millis(100),
            prefetch: 2,
            range_bytes: 16 << 20,
            range_streams: 8,
            config: Vec::new(),
        }
    }
}

/// The default cache root.
pub fn default_cache_root() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("MOTLEY_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("motley")))
        .or_else(|| var("HOME").map(|p| p.join(".cache/motley")))
        .unwrap_or_else(std::env::temp_dir)
        .join("remote")
}

fn install_crypto() {
    // reqwest runs on rustls without a built-in provider: ring, installed once per process.
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// An object store and the prefix of a corpus in it, from a location like `s3://bucket/a/b`.
pub fn parse_location(uri: &str, opts: &RemoteOptions) -> Result<(Arc<dyn ObjectStore>, ObjPath)> {
    install_crypto();
    let bad = |detail: String| RemoteError::Location { uri: uri.to_string(), detail };
    let url = url::Url::parse(uri).map_err(|e| bad(e.to_string()))?;
    let retry = RetryConfig {
        backoff: BackoffConfig { init_backoff: opts.backoff, max_backoff: Duration::from_secs(5), base: 2.0 },
        max_retries: opts.retries,
        retry_timeout: Duration::from_secs(120),
    };
    let configured = |k: &str| opts.config.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.as_str());
    let http = url.scheme() == "http"
        || configured("aws_allow_http").or(configured("allow_http")).is_some_and(|v| v == "true" || v == "1")
        || configured("aws_endpoint").is_some_and(|v| v.starts_with("http://"))
        || std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("AWS_ENDPOINT").is_ok_and(|v| v.starts_with("http://"))
        || std::env::var("AWS_ENDPOINT_URL").is_ok_and(|v| v.starts_with("http://"));
    let client = ClientOptions::new().with_allow_http(http).with_connect_timeout(Duration::from_secs(10));
    let err = |e: object_store::Error| bad(e.to_string());
    let path = |p: &str| ObjPath::parse(p.trim_matches('/')).map_err(|e| bad(e.to_string()));
    // One store per bucket and options for the whole process: its HTTP client keeps its
    // connections (and TLS sessions) and its credentials, instead of a new client, handshake
    // and credential lookup for every object.
    static STORES: std::sync::OnceLock<Mutex<std::collections::HashMap<String, Arc<dyn ObjectStore>>>> =
        std::sync::OnceLock::new();
    let key = format!(
        "{}://{}|{:?}|{}|{:?}|{http}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        opts.config,
        opts.retries,
        opts.backoff
    );
    let cached = STORES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
    let store: Arc<dyn ObjectStore> = match (cached, url.scheme()) {
        (Some(store), scheme) if !matches!(scheme, "http" | "https") => store,
        (_, "s3" | "s3a") => Arc::new(
            opts.config
                .iter()
                .filter_map(|(k, v)| Some((k.to_ascii_lowercase().parse().ok()?, v)))
                .fold(object_store::aws::AmazonS3Builder::from_env(), |b, (k, v)| b.with_config(k, v))
                .with_url(uri)
                .with_retry(retry)
                .with_client_options(client)
                .build()
                .map_err(err)?,
        ),
        (_, "gs") => Arc::new(
            opts.config
                .iter()
                .filter_map(|(k, v)| Some((k.to_ascii_lowercase().parse().ok()?, v)))
                .fold(object_store::gcp::GoogleCloudStorageBuilder::from_env(), |b, (k, v)| b.with_config(k, v))
                .with_url(uri)
                .with_retry(retry)
                .with_client_options(client)
                .build()
                .map_err(err)?,
        ),
        (_, "az" | "azure" | "abfs" | "abfss" | "adl") => Arc::new(
            opts.config
                .iter()
                .filter_map(|(k, v)| Some((k.to_ascii_lowercase().parse().ok()?, v)))
                .fold(object_store::azure::MicrosoftAzureBuilder::from_env(), |b, (k, v)| b.with_config(k, v))
                .with_url(uri)
                .with_retry(retry)
                .with_client_options(client)
                .build()
                .map_err(err)?,
        ),
        (_, "http" | "https") => {
            // The whole URL is the base; objects are relative to it.
            let base = uri.trim_end_matches('/');
            let store = object_store::http::HttpBuilder::new()
                .with_url(base)
                .with_retry(retry)
                .with_client_options(client)
                .build()
                .map_err(err)?;
            return Ok((Arc::new(store), ObjPath::default()));
        }
        (_, other) => return Err(bad(format!("unsupported scheme {other:?} (s3, gs, az, http, https)"))),
    };
    STORES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner()).insert(key, store.clone());
    let prefix = match url.scheme() {
        // az://container/path and friends: object_store's parser knows each form.
        "az" | "azure" | "abfs" | "abfss" | "adl" => {
            let (_, p) = object_store::ObjectStoreScheme::parse(&url).map_err(|e| bad(e.to_string()))?;
            p
        }
        _ => path(url.path())?,
    };
    Ok((store, prefix))
}

fn child(prefix: &ObjPath, name: &str) -> ObjPath {
    prefix.clone().join(name)
}

fn describe(uri: &str, name: &str) -> String {
    format!("{}/{name}", uri.trim_end_matches('/'))
}

/// Whether an object store error is worth retrying (the network, the server), rather than a
/// statement about the object (absent, forbidden, bad request).
fn transient(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. }
    )
}

/// A small runtime per process for the blocking callers (the loader thread, the CLI).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("motley-remote")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the object store runtime: {e}"))
    })
}

/// Runs `fut` on the runtime and waits for it from any thread (also from inside another
/// runtime, where `block_on` would refuse).
fn block<T: Send + 'static>(fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().unwrap_or_else(|_| panic!("object store task dropped"))
}

/// Fetches a whole object with retries (object_store retries each request; a body cut off
/// mid-stream is retried here).
fn get_bytes(store: &Arc<dyn ObjectStore>, path: &ObjPath, object: &str, opts: &RemoteOptions) -> Result<Vec<u8>> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (s, p) = (store.clone(), path.clone());
        let r = block(async move { s.get(&p).await?.bytes().await });
        match r {
            Ok(b) => return Ok(b.to_vec()),
            Err(e) if transient(&e) && attempt <= outer_retries(opts) => {
                tracing::warn!("{object}: {e}; retrying");
                std::thread::sleep(backoff(opts, attempt));
            }
            Err(source) => {
                return Err(RemoteError::Object { object: object.to_string(), op: "GET", attempts: attempt, source });
            }
        }
    }
}

/// Fetches `size` bytes of an object as range reads of `opts.range_bytes`, each retried on
/// its own, `opts.range_streams` at once; a server that does not honour Range is an error, not
/// a silent full download.
fn get_ranges(
    store: &Arc<dyn ObjectStore>,
    path: &ObjPath,
    object: &str,
    size: u64,
    opts: &RemoteOptions,
) -> Result<Vec<u8>> {
    let out = Mutex::new(vec![0u8; size as usize]);
    for_each_range(store, path, object, size, opts, &|at, b| {
        let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
        out[at as usize..at as usize + b.len()].copy_from_slice(b);
        Ok(())
    })?;
    Ok(out.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Fetches `size` bytes of an object as range reads of `opts.range_bytes` (each retried on its
/// own: a failure resumes at that range, not at byte 0), up to `opts.range_streams` in flight
/// at once, handing each to `sink` with its offset as it arrives (any order). Memory: one
/// range per stream. The first error stops the others and is returned.
fn for_each_range(
    store: &Arc<dyn ObjectStore>,
    path: &ObjPath,
    object: &str,
    size: u64,
    opts: &RemoteOptions,
    sink: &(dyn Fn(u64, &[u8]) -> Result<()> + Sync),
) -> Result<()> {
    let part = opts.range_bytes.max(1);
    let parts = size.div_ceil(part);
    let streams = (opts.range_streams.max(1) as u64).min(parts.max(1)) as usize;
    let next = std::sync::atomic::AtomicU64::new(0);
    let failed: Mutex<Option<RemoteError>> = Mutex::new(None);
    let work = || {
        loop {
            if failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                return;
            }
            let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if i >= parts {
                return;
            }
            let (at, end) = (i * part, ((i + 1) * part).min(size));
            let r = get_range(store, path, object, at, end, opts).and_then(|b| sink(at, &b));
            if let Err(e) = r {
                failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                return;
            }
        }
    };
    if streams <= 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 0..streams {
                s.spawn(work);
            }
        });
    }
    failed.into_inner().unwrap_or_else(|p| p.into_inner()).map_or(Ok(()), Err)
}

/// Bytes `at..end` of an object, retried on transient errors; a short answer is an error.
fn get_range(
    store: &Arc<dyn ObjectStore>,
    path: &ObjPath,
    object: &str,
    at: u64,
    end: u64,
    opts: &RemoteOptions,
) -> Result<impl std::ops::Deref<Target = [u8]>> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (s, p) = (store.clone(), path.clone());
        match block(async move { s.get_range(&p, at..end).await }) {
            Ok(b) if b.len() as u64 == end - at => return Ok(b),
            Ok(b) => {
                return Err(RemoteError::Object {
                    object: object.to_string(),
                    op: "GET range",
                    attempts: attempt,
                    source: object_store::Error::Generic {
                        store: "motley",
                        source: format!(
                            "bytes {at}..{end}: got {} bytes (the object is shorter than the manifest says)",
                            b.len()
                        )
                        .into(),
                    },
                });
            }
            Err(e) if transient(&e) && attempt <= outer_retries(opts) => {
                tracing::warn!("{object} bytes {at}..{end}: {e}; retrying");
                std::thread::sleep(backoff(opts, attempt));
            }
            Err(source) => {
                return Err(RemoteError::Object {
                    object: object.to_string(),
                    op: "GET range",
                    attempts: attempt,
                    source,
                });
            }
        }
    }
}

/// Whole-request retries on top of object_store's own per-request ones (which already back off
/// `opts.retries` times): these cover a body cut off mid-stream, so two are enough.
fn outer_retries(opts: &RemoteOptions) -> usize {
    opts.retries.min(2)
}

fn backoff(opts: &RemoteOptions, attempt: usize) -> Duration {
    let ms = opts.backoff.as_millis() as u64 * (1u64 << attempt.min(6) as u64);
    Duration::from_millis(ms.min(5000))
}

#[derive(Debug)]
struct State {
    /// Shards present in the cache directory (checked on arrival), least recently used last.
    present: lru::LruCache<usize, u64>,
    bytes: u64,
    /// Shards the corpus has mapped: never evicted.
    pinned: HashSet<usize>,
    inflight: HashSet<usize>,
    warned_full: bool,
}

/// The [`ShardStore`] of a remote corpus: one cache directory, shards fetched on demand or
/// ahead, evicted when released and over the limit.
#[derive(Debug)]
pub struct RemoteStore {
    uri: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    dir: PathBuf,
    opts: RemoteOptions,
    shards: Vec<ShardStats>,
    state: Mutex<State>,
    changed: Condvar,
    ahead: Mutex<Option<std::sync::mpsc::Sender<Vec<usize>>>>,
}

impl RemoteStore {
    /// The cache directory holding the manifest and the fetched shards.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of shard files in the cache now.
    pub fn cached_bytes(&self) -> u64 {
        self.state.lock().map(|s| s.bytes).unwrap_or(0)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn sidecar(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.blake3"))
    }

    /// Shards already in the cache from an earlier run, recognized by their size and the
    /// blake3 recorded when they arrived (which must be the manifest's).
    fn scan(&self, state: &mut State) {
        for (i, s) in self.shards.iter().enumerate() {
            let ok = std::fs::metadata(self.path(&s.name)).is_ok_and(|m| m.len() == s.bytes)
                && std::fs::read_to_string(self.sidecar(&s.name)).is_ok_and(|h| h.trim() == s.blake3);
            if ok {
                state.present.put(i, s.bytes);
                state.bytes += s.bytes;
            }
        }
    }

    /// Makes shard `i` present (fetching it, or waiting for a fetch under way); `pin` keeps
    /// it from eviction until released.
    fn obtain(&self, i: usize, pin: bool) -> Result<PathBuf> {
        let entry = self.shards.get(i).ok_or_else(|| RemoteError::Location {
            uri: self.uri.clone(),
            detail: format!("shard {i} is not in the manifest"),
        })?;
        let path = self.path(&entry.name);
        {
            let mut st = self.state.lock().map_err(|_| poisoned(&self.dir))?;
            loop {
                if st.present.get(&i).is_some() {
                    if pin {
                        st.pinned.insert(i);
                    }
                    return Ok(path);
                }
                if !st.inflight.contains(&i) {
                    break;
                }
                st = self.changed.wait(st).map_err(|_| poisoned(&self.dir))?;
            }
            st.inflight.insert(i);
        }
        let r = self.download(entry);
        let mut st = self.state.lock().map_err(|_| poisoned(&self.dir))?;
        st.inflight.remove(&i);
        if r.is_ok() {
            st.present.put(i, entry.bytes);
            st.bytes += entry.bytes;
            if pin {
                st.pinned.insert(i);
            }
            self.evict(&mut st);
        }
        self.changed.notify_all();
        r.map(|()| path)
    }

    /// Downloads one shard into a temporary file, checks size and blake3 against the
    /// manifest, records the hash and renames the file into place.
    fn download(&self, entry: &ShardStats) -> Result<()> {
        let object = describe(&self.uri, &entry.name);
        let t0 = std::time::Instant::now();
        let bytes = get_ranges(&self.store, &child(&self.prefix, &entry.name), &object, entry.bytes, &self.opts)?;
        let actual = blake3::hash(&bytes).to_hex().to_string();
        if bytes.len() as u64 != entry.bytes || actual != entry.blake3 {
            return Err(RemoteError::Checksum {
                object,
                expected: entry.blake3.clone(),
                actual,
                expected_bytes: entry.bytes,
                actual_bytes: bytes.len() as u64,
            });
        }
        let tid = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
        let tmp = self.dir.join(format!(".{}.part-{}-{tid}", entry.name, std::process::id()));
        write_file(&tmp, &bytes)?;
        let side_tmp = self.dir.join(format!(".{}.blake3.part-{}-{tid}", entry.name, std::process::id()));
        write_file(&side_tmp, actual.as_bytes())?;
        let side = self.sidecar(&entry.name);
        std::fs::rename(&side_tmp, &side).map_err(|e| io(&side, "rename", e))?;
        let path = self.path(&entry.name);
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, "rename", e))?;
        tracing::debug!("{object}: {} bytes in {:.2} s", bytes.len(), t0.elapsed().as_secs_f64());
        Ok(())
    }

    /// Deletes released shards, least recently used first, while the cache is over its limit.
    fn evict(&self, st: &mut State) {
        let limit = self.opts.cache_limit;
        while limit > 0 && st.bytes > limit {
            let victim = st.present.iter().rev().map(|(&i, _)| i).find(|i| !st.pinned.contains(i));
            let Some(i) = victim else {
                if !st.warned_full {
                    tracing::warn!(
                        "{}: cache limit {limit} bytes is below the shards in use ({} bytes)",
                        self.dir.display(),
                        st.bytes
                    );
                    st.warned_full = true;
                }
                return;
            };
            if let Some(bytes) = st.present.pop(&i) {
                st.bytes -= bytes;
                if let Some(s) = self.shards.get(i) {
                    let _ = std::fs::remove_file(self.sidecar(&s.name));
                    let _ = std::fs::remove_file(self.path(&s.name));
                    tracing::debug!("evicted {}", s.name);
                }
            }
        }
    }

    /// Whether shard `i` fits beside what is cached without evicting shards in use.
    fn room_for(&self, i: usize) -> bool {
        let limit = self.opts.cache_limit;
        let Ok(st) = self.state.lock() else { return false };
        let need = self.shards.get(i).map_or(0, |s| s.bytes);
        let evictable: u64 = st.present.iter().filter(|(j, _)| !st.pinned.contains(j)).map(|(_, &b)| b).sum::<u64>();
        limit == 0 || st.bytes.saturating_sub(evictable) + need <= limit
    }
}

fn poisoned(dir: &Path) -> RemoteError {
    RemoteError::Io { path: dir.to_path_buf(), op: "lock", source: std::io::Error::other("cache state poisoned") }
}

fn io(path: &Path, op: &'static str, source: std::io::Error) -> RemoteError {
    RemoteError::Io { path: path.to_path_buf(), op, source }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| io(path, "create", e))?;
    f.write_all(bytes).map_err(|e| io(path, "write", e))
}

impl ShardStore for RemoteStore {
    fn ensure(&self, index: usize, _entry: &ShardStats) -> motley_shards::Result<PathBuf> {
        self.obtain(index, true).map_err(ShardError::from)
    }

    fn upcoming(&self, order: &[usize]) {
        let want: Vec<usize> = order.iter().copied().take(self.opts.prefetch).collect();
        if let Ok(g) = self.ahead.lock()
            && let Some(tx) = g.as_ref()
        {
            let _ = tx.send(want);
        }
    }

    fn released(&self, index: usize) {
        if let Ok(mut st) = self.state.lock() {
            st.pinned.remove(&index);
            self.evict(&mut st);
        }
    }
}

/// The fetch-ahead thread: fetches the hinted shards that fit the cache, newest hint first.
fn spawn_ahead(store: &Arc<RemoteStore>) {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<usize>>();
    let weak: Weak<RemoteStore> = Arc::downgrade(store);
    let spawned = std::thread::Builder::new().name("motley-fetch-ahead".into()).spawn(move || {
        while let Ok(mut want) = rx.recv() {
            while let Ok(newer) = rx.try_recv() {
                want = newer;
            }
            let Some(store) = weak.upgrade() else { return };
            for i in want {
                if !store.room_for(i) {
                    break;
                }
                // Errors surface when the loader asks for the shard itself.
                if let Err(e) = store.obtain(i, false) {
                    tracing::debug!("fetch ahead: {e}");
                    break;
                }
            }
        }
    });
    if spawned.is_ok()
        && let Ok(mut g) = store.ahead.lock()
    {
        *g = Some(tx);
    }
}

/// The cache directory of corpus `uri` under `opts`.
pub fn cache_dir_for(uri: &str, opts: &RemoteOptions) -> PathBuf {
    let root = opts.cache_dir.clone().unwrap_or_else(default_cache_root);
    let uri = uri.trim_end_matches('/');
    let hash = blake3::hash(uri.as_bytes()).to_hex();
    let tail: String = uri
        .rsplit('/')
        .next()
        .unwrap_or("corpus")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(40)
        .collect();
    root.join(format!("{tail}-{}", &hash[..16]))
}

/// Opens the corpus at `uri`: fetches its manifest into the cache directory and returns a
/// [`Corpus`] whose shards are fetched as the reader needs them.
pub fn open(uri: &str, opts: &RemoteOptions) -> Result<Corpus> {
    Ok(open_store(uri, opts)?.0)
}

/// [`open`], also returning the store (its cache directory and usage).
pub fn open_store(uri: &str, opts: &RemoteOptions) -> Result<(Corpus, Arc<RemoteStore>)> {
    let (store, prefix) = parse_location(uri, opts)?;
    let dir = cache_dir_for(uri, opts);
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, "create dir", e))?;
    let object = describe(uri, MANIFEST_NAME);
    let bytes = get_bytes(&store, &child(&prefix, MANIFEST_NAME), &object, opts)?;
    let marker = dir.join(motley_shards::store::REMOTE_MARKER);
    write_file(&marker, uri.trim_end_matches('/').as_bytes())?;
    let path = dir.join(MANIFEST_NAME);
    let tmp = dir.join(format!(".{MANIFEST_NAME}.part-{}", std::process::id()));
    write_file(&tmp, &bytes)?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, "rename", e))?;
    let manifest = Manifest::read(&dir).map_err(|e| match e {
        ShardError::Manifest { detail, .. } => ShardError::Manifest { path: object.clone().into(), detail },
        e => e,
    })?;
    let mut state = State {
        present: lru::LruCache::unbounded(),
        bytes: 0,
        pinned: HashSet::new(),
        inflight: HashSet::new(),
        warned_full: false,
    };
    let rs = RemoteStore {
        uri: uri.trim_end_matches('/').to_string(),
        store,
        prefix,
        dir: dir.clone(),
        opts: opts.clone(),
        shards: manifest.shards.clone(),
        state: Mutex::new(State {
            present: lru::LruCache::unbounded(),
            bytes: 0,
            pinned: HashSet::new(),
            inflight: HashSet::new(),
            warned_full: false,
        }),
        changed: Condvar::new(),
        ahead: Mutex::new(None),
    };
    rs.scan(&mut state);
    if let Ok(mut st) = rs.state.lock() {
        *st = state;
    }
    // Tokenizer files come along, best effort: `shards head` decodes with them, `sample` and a
    // run's snapshot (RUN/tokenizers/) need them.
    for (_, rel) in manifest.tokenizer_files() {
        let path = dir.join(rel);
        if path.exists() {
            continue;
        }
        let object = describe(uri, rel);
        match get_bytes(&rs.store, &child_rel(&rs.prefix, rel), &object, opts) {
            Ok(bytes) => {
                if let Some(parent) = path.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let tmp = path.with_extension(format!("part-{}", std::process::id()));
                if write_file(&tmp, &bytes).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
            Err(e) => tracing::debug!("{e}"),
        }
    }
    let rs = Arc::new(rs);
    spawn_ahead(&rs);
    let corpus = Corpus::open_with_store(&dir, rs.clone())?;
    Ok((corpus, rs))
}

/// What [`upload`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UploadReport {
    pub shards: usize,
    pub bytes: u64,
}

/// Uploads the corpus in `local` to `uri`: every shard, then the manifest, so a reader never
/// sees a manifest naming a missing shard. A shard whose object is already there with its size
/// is not sent again (uploaded as its ingest task finished, or by an interrupted upload; its
/// local file may be gone). `progress` gets the bytes done after each shard.
pub fn upload(local: &Path, uri: &str, opts: &RemoteOptions, progress: &dyn Fn(u64)) -> Result<UploadReport> {
    let (store, prefix) = parse_location(uri, opts)?;
    let manifest = Manifest::read(local)?;
    let there: std::collections::HashMap<String, u64> = list_inputs(uri, opts)?
        .into_iter()
        .filter_map(|(u, size)| Some((u.strip_prefix(&describe(uri, ""))?.to_string(), size)))
        .collect();
    let mut report = UploadReport::default();
    for s in &manifest.shards {
        if there.get(&s.name) == Some(&s.bytes) {
            report.bytes += s.bytes;
            progress(report.bytes);
            continue;
        }
        let path = local.join(&s.name);
        objects::put_file_at(&store, &child(&prefix, &s.name), &describe(uri, &s.name), &path, opts)?;
        report.shards += 1;
        report.bytes += s.bytes;
        progress(report.bytes);
    }
    // The tokenizer files the manifest names travel with the corpus (before the manifest).
    for (_, rel) in manifest.tokenizer_files() {
        let path = local.join(rel);
        if let Ok(bytes) = std::fs::read(&path) {
            put(&store, &child_rel(&prefix, rel), &describe(uri, rel), bytes, opts)?;
        }
    }
    let path = local.join(MANIFEST_NAME);
    let bytes = std::fs::read(&path).map_err(|e| io(&path, "read", e))?;
    put(&store, &child(&prefix, MANIFEST_NAME), &describe(uri, MANIFEST_NAME), bytes, opts)?;
    Ok(report)
}

fn child_rel(prefix: &ObjPath, rel: &str) -> ObjPath {
    rel.split('/').fold(prefix.clone(), |p, part| p.join(part))
}

/// Writes one object (multipart in 16 MiB parts past 64 MiB), retrying transient errors.
fn put(store: &Arc<dyn ObjectStore>, path: &ObjPath, object: &str, bytes: Vec<u8>, opts: &RemoteOptions) -> Result<()> {
    let bytes = Arc::new(bytes);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (s, p, b) = (store.clone(), path.clone(), bytes.clone());
        let r = block(async move {
            if b.len() <= 64 << 20 {
                s.put(&p, PutPayload::from(b.as_ref().clone())).await.map(|_| ())
            } else {
                let upload = s.put_multipart(&p).await?;
                let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, 16 << 20);
                w.write(&b);
                w.finish().await.map(|_| ())
            }
        });
        match r {
            Ok(()) => return Ok(()),
            Err(e) if transient(&e) && attempt <= outer_retries(opts) => {
                tracing::warn!("{object}: {e}; retrying");
                std::thread::sleep(backoff(opts, attempt));
            }
            Err(source) => {
                return Err(RemoteError::Object { object: object.to_string(), op: "PUT", attempts: attempt, source });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every scheme the CLI documents parses to a store and the object prefix under it (no
    /// request is made: building a store does not contact it).
    #[test]
    fn locations_of_each_store_parse_to_their_prefix() {
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        let opts = RemoteOptions {
            config: vec![
                kv("aws_region", "us-east-1"),
                kv("aws_access_key_id", "x"),
                kv("aws_secret_access_key", "x"),
                kv("azure_storage_account_name", "acct"),
                kv("azure_storage_account_key", "eA=="),
            ],
            ..RemoteOptions::default()
        };
        for (uri, prefix) in [
            ("s3://bkt/corpora/c1", "corpora/c1"),
            ("s3://bkt/corpora/c1/", "corpora/c1"),
            ("gs://bkt/corpora/c1", "corpora/c1"),
            ("az://container/corpora/c1", "corpora/c1"),
            ("https://example.org/data/c1", ""),
        ] {
            let (_, p) = parse_location(uri, &opts).unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(p.as_ref(), prefix, "{uri}");
        }
        let err = parse_location("ftp://host/c1", &opts).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("unsupported scheme") && err.contains("ftp://host/c1"), "{err}");
        assert_eq!(describe("s3://bkt/c1/", "manifest.json"), "s3://bkt/c1/manifest.json");
    }
}
