//! Object-store locations on the command line: the opener that lets every corpus argument be
//! `s3://…`, `gs://…`, `az://…` or `http(s)://…` (motley-remote behind motley-shards' hook),
//! `--out` to an object store: write into a local staging folder, then upload the shards
//! and the manifest last; and ingest inputs in object stores (listed, fetched per task).

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use motley_remote::RemoteOptions;

/// The options of this process (global `--cache-dir`, `--cache-limit`, `--range-streams`).
pub fn options(cache_dir: Option<PathBuf>, cache_limit: Option<u64>, range_streams: Option<usize>) -> RemoteOptions {
    let mut o = RemoteOptions { cache_dir, ..RemoteOptions::default() };
    if let Some(l) = cache_limit {
        o.cache_limit = l;
    }
    if let Some(n) = range_streams {
        o.range_streams = n.max(1);
    }
    o
}

/// Registers the opener for `scheme://` corpus locations, and the object-store access ingest
/// uses for `scheme://` inputs.
pub fn install(opts: RemoteOptions) {
    motley_ingest::remote_input::set_input_store(Inputs(opts.clone()));
    motley_shards::store::set_remote_opener(move |uri| motley_remote::open(uri, &opts).map_err(Into::into));
}

/// Ingest inputs in object stores through motley-remote; fetched objects live in
/// `<cache-dir>/inputs/` while their task runs.
struct Inputs(RemoteOptions);

impl motley_ingest::remote_input::InputStore for Inputs {
    fn list(&self, pattern: &str) -> Result<Vec<(String, u64)>, String> {
        motley_remote::list_inputs(pattern, &self.0).map_err(|e| e.to_string())
    }

    fn fetch(&self, uri: &str, size: u64, dest: &Path) -> Result<(), String> {
        motley_remote::fetch_input(uri, size, dest, &self.0).map_err(|e| e.to_string())
    }

    fn cache_dir(&self) -> PathBuf {
        self.0.cache_dir.clone().unwrap_or_else(motley_remote::default_cache_root).join("inputs")
    }

    fn put(&self, local: &Path, uri: &str) -> Result<(), String> {
        motley_remote::put_file(uri, local, &self.0).map_err(|e| e.to_string())
    }
}

/// Replaces each object-store location by its local cache folder (fetching the manifest):
/// everything downstream, the trainer's start-up checks included, then reads a local
/// manifest, and the folder's marker file reopens the remote corpus for the shards. Returns
/// where each path came from (`""` for a local one; empty when all are local), which a run
/// records as `data.origins`.
pub fn localize(paths: &mut [PathBuf], opts: &RemoteOptions) -> anyhow::Result<Vec<String>> {
    let mut origins = vec![String::new(); paths.len()];
    for (p, origin) in paths.iter_mut().zip(&mut origins) {
        if let Some(uri) = p.to_str().filter(|s| motley_shards::store::is_remote(s)).map(str::to_string) {
            let (_, store) = motley_remote::open_store(&uri, opts)?;
            tracing::info!("{uri}: cached in {}", store.dir().display());
            *p = store.dir().to_path_buf();
            *origin = uri;
        }
    }
    if origins.iter().all(String::is_empty) {
        origins.clear();
    }
    Ok(origins)
}

/// The corpora a run (or checkpoint) trained on, fetched again into this machine's cache when
/// they came from an object store (`data.origins`); None when all were on disk, so the
/// recorded paths stand.
pub fn recorded_corpora(run: &Path, opts: &RemoteOptions) -> anyhow::Result<Option<(Vec<PathBuf>, Vec<String>)>> {
    let ckpt = motley_trainer::checkpoint::resolve(run)?;
    let data = motley_trainer::checkpoint::read_meta(&ckpt)?.config.data;
    if data.origins.iter().all(String::is_empty) {
        return Ok(None);
    }
    let mut paths: Vec<PathBuf> = data
        .paths
        .iter()
        .zip(&data.origins)
        .map(|(p, o)| if o.is_empty() { p.clone() } else { PathBuf::from(o) })
        .collect();
    let origins = localize(&mut paths, opts)?;
    Ok(Some((paths, origins)))
}

/// `--set` values for a run's corpora: `data.paths`, and `data.origins` when any is remote.
pub fn data_overrides(paths: &[PathBuf], origins: &[String]) -> Vec<String> {
    let quoted = |v: Vec<String>| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(",");
    vec![
        format!("data.paths=[{}]", quoted(paths.iter().map(|p| p.display().to_string()).collect())),
        format!("data.origins=[{}]", quoted(origins.to_vec())),
    ]
}

/// Whether a path argument is an object-store location.
pub fn is_remote(p: &Path) -> bool {
    p.to_str().is_some_and(motley_shards::store::is_remote)
}

/// The local folder a remote `--out` is built in first (stable per location, so an interrupted
/// ingest resumes there).
pub fn staging_dir(uri: &str, opts: &RemoteOptions) -> PathBuf {
    let dir = motley_remote::cache_dir_for(uri, opts);
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    dir.with_file_name(format!("upload-{name}"))
}

/// Uploads the corpus in `local` to `uri` with a progress bar on stderr.
pub fn upload(local: &Path, uri: &str, opts: &RemoteOptions) -> anyhow::Result<motley_remote::UploadReport> {
    let total = motley_shards::Manifest::read(local)?.bytes;
    let pb = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("uploading {bytes}/{total_bytes} {bar:30} {eta}") {
        pb.set_style(style);
    }
    let r = motley_remote::upload(local, uri, opts, &|b| pb.set_position(b));
    pb.finish_and_clear();
    Ok(r?)
}
