//! Training runs in object stores. `train --out s3://…` trains in a local staging folder and
//! rank 0 copies each checkpoint, with the run's files, to the location in the background as
//! soon as it is written; `train --resume`, `eval --checkpoint` and `sample --checkpoint` take
//! such a location (a run, or one `checkpoints/step-N` in it) and fetch its latest complete
//! checkpoint first.
//!
//! The location holds the run directory's own layout (config.toml, metrics.jsonl, losses.png,
//! tokenizers/, checkpoints/step-N/). A checkpoint's `meta.json` is uploaded after everything
//! else of it and deleted before the rest of it, so a listed `meta.json` means a complete
//! checkpoint there, as on disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{Context, bail};
use motley_remote::RemoteOptions;
use motley_trainer::{checkpoint, per_rank};

const META: &str = "meta.json";
const OPTIMIZER: &str = "optimizer.safetensors";
/// The run's own files, copied with every checkpoint (before its `meta.json`).
const RUN_FILES: [&str; 3] = ["config.toml", "metrics.jsonl", "losses.png"];

/// The local folder a run at `uri` trains in (stable per location and cache, so a resume on
/// the same machine finds what it already has).
pub fn staging_dir(uri: &str, opts: &RemoteOptions) -> PathBuf {
    let dir = motley_remote::cache_dir_for(uri, opts);
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    dir.with_file_name(format!("run-{name}"))
}

fn join(uri: &str, rel: &str) -> String {
    format!("{}/{rel}", uri.trim_end_matches('/'))
}

/// Every object under `uri` as (path relative to it, bytes).
fn list(uri: &str, opts: &RemoteOptions) -> anyhow::Result<BTreeMap<String, u64>> {
    let base = uri.trim_end_matches('/');
    Ok(motley_remote::list_inputs(base, opts)?
        .into_iter()
        .filter_map(|(u, size)| u.strip_prefix(base).map(|r| (r.trim_start_matches('/').to_string(), size)))
        .filter(|(rel, _)| !rel.is_empty())
        .collect())
}

/// The steps of the complete checkpoints in a listing (those whose `meta.json` is there).
fn complete_steps(objects: &BTreeMap<String, u64>) -> Vec<u64> {
    let mut steps: Vec<u64> = objects
        .keys()
        .filter_map(|k| k.strip_prefix("checkpoints/step-")?.strip_suffix("/meta.json")?.parse().ok())
        .collect();
    steps.sort_unstable();
    steps
}

fn step_rel(step: u64) -> String {
    format!("checkpoints/step-{step:08}")
}

/// A fresh run at `uri`: refused when the location already holds objects, unless `overwrite`
/// (they are deleted). Returns the cleared local staging folder.
pub fn prepare_new(uri: &str, overwrite: bool, opts: &RemoteOptions) -> anyhow::Result<PathBuf> {
    let objects = list(uri, opts)?;
    if !objects.is_empty() {
        if !overwrite {
            bail!(
                "run directory {uri}: already holds {} objects; pass --resume to continue it or --overwrite to start over",
                objects.len()
            );
        }
        // meta.json first: a run cut off here shows no checkpoint rather than half of one.
        let (metas, rest): (Vec<_>, Vec<_>) = objects.keys().partition(|k| k.ends_with(META));
        for rel in metas.into_iter().chain(rest) {
            motley_remote::delete_object(&join(uri, rel), opts)?;
        }
    }
    let dir = staging_dir(uri, opts);
    motley_trainer::train::prepare_run_dir(&dir, true)?;
    Ok(dir)
}

/// The `meta.json` of the latest complete checkpoint of the run at `uri` (None: it has none),
/// fetched into a temporary folder and read as a local one is.
pub fn latest_meta(uri: &str, opts: &RemoteOptions) -> anyhow::Result<Option<checkpoint::Meta>> {
    let uri = uri.trim_end_matches('/');
    let objects = list(uri, opts)?;
    let Some(step) = complete_steps(&objects).pop() else { return Ok(None) };
    let rel = format!("{}/{META}", step_rel(step));
    let tmp = tempfile::tempdir()?;
    motley_remote::fetch_input(&join(uri, &rel), objects[&rel], &tmp.path().join(META), opts)?;
    Ok(Some(checkpoint::read_meta(tmp.path()).with_context(|| join(uri, &rel))?))
}

/// What a command needs of a run in an object store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Everything: weights, optimizer state, metrics (train --resume).
    Resume,
    /// Weights, meta.json and tokenizers (eval, sample).
    Weights,
}

/// Fetches the run at `uri` (or the one checkpoint `uri` names) into its staging folder and
/// returns the run's location and the local path to use instead of `uri`: the run folder for a
/// run, the checkpoint folder for a checkpoint. Files already there at the listed size are not fetched again; ranks sharing
/// a machine take turns (a lock file), so the second finds the first's files.
pub fn pull(uri: &str, need: Need, opts: &RemoteOptions) -> anyhow::Result<(String, PathBuf)> {
    let uri = uri.trim_end_matches('/');
    let own = list(uri, opts)?;
    // A checkpoint location: `…/checkpoints/step-N` holding a meta.json of its own.
    let (run_uri, step, objects) = match (own.contains_key(META), uri.rsplit_once("/checkpoints/step-")) {
        (true, Some((run, n))) => {
            let step = n.parse::<u64>().with_context(|| format!("{uri}: not a checkpoint location"))?;
            (run.to_string(), step, list(run, opts)?)
        }
        (true, None) => bail!("{uri}: a checkpoint outside a run's checkpoints/ folder"),
        (false, _) => {
            let step = complete_steps(&own).pop().with_context(|| {
                format!(
                    "{uri}: holds no complete checkpoint ({}/checkpoints/step-*/meta.json){}",
                    uri,
                    if own.is_empty() { "; the location is empty" } else { "" }
                )
            })?;
            (uri.to_string(), step, own)
        }
    };
    let local = staging_dir(&run_uri, opts);
    std::fs::create_dir_all(&local).with_context(|| format!("create {}", local.display()))?;
    let lock = std::fs::File::create(local.join(".pull.lock"))?;
    lock.lock().with_context(|| format!("lock {}", local.join(".pull.lock").display()))?;

    let ckpt = step_rel(step);
    let meta = format!("{ckpt}/{META}");
    if !objects.contains_key(&meta) {
        bail!("{}: missing", join(&run_uri, &meta));
    }
    let files = files_to_pull(&objects, step, need);
    let t0 = Instant::now();
    let mut fetched = 0u64;
    for (rel, size) in files {
        let dest = local.join(&rel);
        if std::fs::metadata(&dest).is_ok_and(|m| m.len() == size) && rel != meta {
            continue;
        }
        motley_remote::fetch_input(&join(&run_uri, &rel), size, &dest, opts)?;
        fetched += size;
    }
    if need == Need::Resume {
        // Checkpoints here newer than the location's latest never finished copying there (or
        // belong to an older run at this location): kept aside, not trained over.
        for (s, path) in checkpoint::list(&local)? {
            if s > step {
                let aside = local.join("superseded").join(path.file_name().unwrap_or_default());
                std::fs::create_dir_all(local.join("superseded"))?;
                std::fs::rename(&path, &aside)?;
                tracing::warn!(
                    "{}: step {s} is newer than {run_uri}'s latest complete checkpoint (step {step}); moved to {}",
                    local.display(),
                    aside.display()
                );
            }
        }
    }
    tracing::info!(
        "{run_uri}: checkpoint step {step} in {} ({:.1} MB fetched in {:.1}s)",
        local.display(),
        fetched as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    let _ = lock.unlock();
    let path = if uri == run_uri { local } else { local.join(ckpt) };
    Ok((run_uri, path))
}

/// The optimizer state of a checkpoint: `optimizer.safetensors`, or a per-rank checkpoint's
/// `optimizer-rank-*` files.
fn is_optimizer(name: &str) -> bool {
    name == OPTIMIZER || name.starts_with("optimizer-rank-")
}

/// The objects of a run to fetch for checkpoint `step`: the run's files, its tokenizers and
/// the checkpoint's files (without the optimizer state for [`Need::Weights`]), the
/// checkpoint's `meta.json` last (locally too, a checkpoint is complete once it is there).
/// Only plain relative names: an object called `tokenizers/../../x` is left out.
fn files_to_pull(objects: &BTreeMap<String, u64>, step: u64, need: Need) -> Vec<(String, u64)> {
    let ckpt = step_rel(step);
    let plain = |rel: &str| Path::new(rel).components().all(|c| matches!(c, std::path::Component::Normal(_)));
    let mut files: Vec<(String, u64)> = objects
        .iter()
        .filter(|(rel, _)| plain(rel))
        .filter(|(rel, _)| {
            let run_file = RUN_FILES.contains(&rel.as_str()) || rel.starts_with("tokenizers/");
            let of_ckpt = rel.strip_prefix(&ckpt).and_then(|r| r.strip_prefix('/')).is_some_and(|name| {
                !name.contains('/') && name != META && (need == Need::Resume || !is_optimizer(name))
            });
            run_file || of_ckpt
        })
        .map(|(rel, &size)| (rel.clone(), size))
        .collect();
    let meta = format!("{ckpt}/{META}");
    if let Some(&size) = objects.get(&meta) {
        files.push((meta, size));
    }
    files
}

/// `path`, or when it is an object-store location the local copy of its latest checkpoint's
/// weights (or of the checkpoint it names): what eval and sample read.
pub fn localize(path: &Path, opts: &RemoteOptions) -> anyhow::Result<PathBuf> {
    localize_for(path, Need::Weights, opts)
}

/// [`localize`], fetching what `need` says (the optimizer state too for [`Need::Resume`]).
pub fn localize_for(path: &Path, need: Need, opts: &RemoteOptions) -> anyhow::Result<PathBuf> {
    match path.to_str().filter(|s| motley_shards::store::is_remote(s)) {
        Some(uri) => Ok(pull(uri, need, opts)?.1),
        None => Ok(path.to_path_buf()),
    }
}

/// Copies a training run's checkpoints to `uri` on a background thread, newest first: a
/// checkpoint written while another is being copied waits for it, and one overtaken by a
/// newer one before its copy started is skipped. Local pruning leaves the checkpoint being
/// copied alone.
pub struct ObjectMirror {
    shared: Arc<Shared>,
    worker: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    uri: String,
    opts: RemoteOptions,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// The newest checkpoint not yet copied: (run, checkpoint).
    pending: Option<(PathBuf, PathBuf)>,
    in_use: Option<PathBuf>,
    error: Option<String>,
    closed: bool,
    /// Tokenizer files copied so far (they do not change during a run).
    tokenizers_copied: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ObjectMirror {
    pub fn new(uri: &str, opts: RemoteOptions) -> ObjectMirror {
        let shared = Arc::new(Shared {
            uri: uri.trim_end_matches('/').to_string(),
            opts,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("motley-mirror".into())
            .spawn(move || worker(&s))
            .expect("spawn the checkpoint copy thread");
        ObjectMirror { shared, worker: Some(worker) }
    }
}

fn worker(s: &Shared) {
    loop {
        let (run, ckpt, tokenizers) = {
            let mut st = s.lock();
            while st.pending.is_none() && !st.closed {
                st = s.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            let Some((run, ckpt)) = st.pending.take() else { return };
            st.in_use = Some(ckpt.clone());
            (run, ckpt, !st.tokenizers_copied)
        };
        let r = copy_checkpoint(s, &run, &ckpt, tokenizers);
        let mut st = s.lock();
        st.in_use = None;
        match r {
            Ok(()) => st.tokenizers_copied = true,
            Err(e) => {
                st.error = Some(format!("copying {} to {}: {e:#}", ckpt.display(), s.uri));
                st.pending = None;
            }
        }
        s.changed.notify_all();
    }
}

/// One checkpoint: its tensors, the run's files, then its `meta.json`; then the location's
/// checkpoints that the run no longer has are deleted (pruned locally).
fn copy_checkpoint(s: &Shared, run: &Path, ckpt: &Path, tokenizers: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let name = ckpt.file_name().map(|n| n.to_string_lossy().to_string()).context("checkpoint folder name")?;
    // A per-rank checkpoint's rank files were copied by their ranks: checked, not copied.
    let mut files: Vec<PathBuf> = std::fs::read_dir(ckpt)
        .with_context(|| format!("list {}", ckpt.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| p.file_name().is_some_and(|n| n != META && !per_rank::is_rank_file(&n.to_string_lossy())))
        .collect();
    files.sort();
    let mut bytes = 0u64;
    for f in &files {
        let fname = f.file_name().unwrap_or_default().to_string_lossy();
        motley_remote::put_file(&join(&s.uri, &format!("checkpoints/{name}/{fname}")), f, &s.opts)?;
        bytes += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
    }
    if per_rank::Stored::is_per_rank(ckpt) {
        bytes += check_rank_files(s, ckpt, &name)?;
    }
    copy_run_files(s, run, tokenizers)?;
    motley_remote::put_file(&join(&s.uri, &format!("checkpoints/{name}/{META}")), &ckpt.join(META), &s.opts)?;
    prune(s, run)?;
    tracing::info!("{name}: copied to {} ({:.1} MB in {:.1}s)", s.uri, bytes as f64 / 1e6, t0.elapsed().as_secs_f64());
    Ok(())
}

/// A per-rank checkpoint's rank files, which every rank copied itself: all there, and those
/// this node has at its size. Returns their bytes.
fn check_rank_files(s: &Shared, ckpt: &Path, name: &str) -> anyhow::Result<u64> {
    let world = per_rank::RankIndex::read(ckpt)?.world;
    let prefix = join(&s.uri, &format!("checkpoints/{name}"));
    let there = list(&prefix, &s.opts)?;
    let mut bytes = 0;
    for f in per_rank::rank_files(world) {
        let Some(&size) = there.get(&f) else {
            bail!(
                "{prefix}/{f}: missing; its rank wrote it but did not copy it (the checkpoint stays incomplete there)"
            )
        };
        if let Ok(m) = std::fs::metadata(ckpt.join(&f))
            && m.len() != size
        {
            bail!("{prefix}/{f}: {size} bytes, {} here", m.len());
        }
        bytes += size;
    }
    Ok(bytes)
}

fn copy_run_files(s: &Shared, run: &Path, tokenizers: bool) -> anyhow::Result<()> {
    for f in RUN_FILES {
        let path = run.join(f);
        let Ok(mut bytes) = std::fs::read(&path) else { continue };
        if f == "metrics.jsonl" {
            // The trainer appends as this reads: whole lines only.
            bytes.truncate(bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1));
        }
        motley_remote::put_object(&join(&s.uri, f), bytes, &s.opts)?;
    }
    // TensorBoard event files (train.tensorboard) grow: copied whole each time. Older
    // processes' files stay in the location (a resume elsewhere need not fetch them).
    copy_folder(s, run, "tensorboard")?;
    if tokenizers {
        copy_folder(s, run, "tokenizers")?;
    }
    Ok(())
}

/// The files of `run/<folder>` (none when it is missing), as `<folder>/<name>`.
fn copy_folder(s: &Shared, run: &Path, folder: &str) -> anyhow::Result<()> {
    for e in std::fs::read_dir(run.join(folder)).into_iter().flatten().flatten() {
        if e.path().is_file() {
            let rel = format!("{folder}/{}", e.file_name().to_string_lossy());
            motley_remote::put_file(&join(&s.uri, &rel), &e.path(), &s.opts)?;
        }
    }
    Ok(())
}

/// Deletes the location's checkpoints that the local run no longer has, `meta.json` first.
/// Those newer than every local one are left: the ranks may be copying their files of it.
fn prune(s: &Shared, run: &Path) -> anyhow::Result<()> {
    let local: Vec<u64> = checkpoint::list(run)?.into_iter().map(|(step, _)| step).collect();
    let newest = local.iter().max().copied().unwrap_or(0);
    let there = list(&join(&s.uri, "checkpoints"), &s.opts)?;
    let mut gone: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for rel in there.keys() {
        let Some((dir, _)) = rel.split_once('/') else { continue };
        let step = dir.strip_prefix("step-").and_then(|n| n.parse::<u64>().ok());
        if step.is_some_and(|n| n < newest && !local.contains(&n)) {
            gone.entry(dir).or_default().push(rel);
        }
    }
    for (dir, mut rels) in gone {
        rels.sort_by_key(|r| !r.ends_with(META));
        for rel in rels {
            motley_remote::delete_object(&join(&s.uri, &format!("checkpoints/{rel}")), &s.opts)?;
        }
        tracing::info!("{dir}: pruned from {}", s.uri);
    }
    Ok(())
}

impl motley_trainer::mirror::RunMirror for ObjectMirror {
    fn in_use(&self) -> Option<PathBuf> {
        self.shared.lock().in_use.clone()
    }

    fn saved(&self, run: &Path, ckpt: &Path) -> Result<(), String> {
        let mut st = self.shared.lock();
        if let Some(e) = &st.error {
            return Err(e.clone());
        }
        if let Some((_, skipped)) = st.pending.replace((run.to_path_buf(), ckpt.to_path_buf())) {
            tracing::warn!(
                "{}: a newer checkpoint was written before its copy to {} started; copying {} instead \
                 (checkpoints come faster than they upload: raise train.checkpoint_every)",
                skipped.display(),
                self.shared.uri,
                ckpt.display()
            );
        }
        self.shared.changed.notify_all();
        Ok(())
    }

    fn put_run_file(&self, rel: &str, path: &Path) -> Result<(), String> {
        motley_remote::put_file(&join(&self.shared.uri, rel), path, &self.shared.opts)
            .map_err(|e| format!("copying {} to {}: {e:#}", path.display(), self.shared.uri))
    }

    fn wait(&self) -> Result<(), String> {
        let s = &self.shared;
        let mut st = s.lock();
        while (st.pending.is_some() || st.in_use.is_some()) && st.error.is_none() {
            st = s.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.error.clone().map_or(Ok(()), Err)
    }

    fn finish(&self, run: &Path) -> Result<(), String> {
        let s = &self.shared;
        // The last checkpoint's copy may predate the final metrics and plot.
        copy_run_files(s, run, false)
            .and_then(|()| prune(s, run))
            .map_err(|e| format!("copying {} to {}: {e:#}", run.display(), s.uri))
    }
}

impl Drop for ObjectMirror {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_checkpoints_are_those_with_a_meta_json() {
        let objects: BTreeMap<String, u64> = [
            ("checkpoints/step-00000004/model.safetensors", 10),
            ("checkpoints/step-00000004/meta.json", 1),
            ("checkpoints/step-00000008/model.safetensors", 10),
            ("checkpoints/step-00000012/meta.json", 1),
            ("metrics.jsonl", 5),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(complete_steps(&objects), vec![4, 12]);
    }

    #[test]
    fn a_pull_takes_one_checkpoint_meta_last_and_no_names_that_climb_out() {
        let objects: BTreeMap<String, u64> = [
            "config.toml",
            "metrics.jsonl",
            "tokenizers/text.json",
            "tokenizers/../../../etc/passwd",
            "checkpoints/step-00000004/meta.json",
            "checkpoints/step-00000004/model.safetensors",
            "checkpoints/step-00000004/optimizer.safetensors",
            "checkpoints/step-00000008/model.safetensors",
            "checkpoints/step-00000008/ranks.json",
            "checkpoints/step-00000008/model-rank-00000-of-00002.safetensors",
            "checkpoints/step-00000008/optimizer-rank-00000-of-00002.safetensors",
            "checkpoints/step-00000008/meta.json",
            "notes/other.txt",
        ]
        .into_iter()
        .map(|k| (k.to_string(), 1))
        .collect();
        let names = |need| files_to_pull(&objects, 4, need).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            names(Need::Resume),
            [
                "checkpoints/step-00000004/model.safetensors",
                "checkpoints/step-00000004/optimizer.safetensors",
                "config.toml",
                "metrics.jsonl",
                "tokenizers/text.json",
                "checkpoints/step-00000004/meta.json",
            ]
        );
        assert!(!names(Need::Weights).iter().any(|n| n.ends_with("optimizer.safetensors")));
        // A per-rank checkpoint: its index and every rank's files; weights only for eval.
        let at8 = |need| files_to_pull(&objects, 8, need).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert!(
            at8(Need::Resume).contains(&"checkpoints/step-00000008/optimizer-rank-00000-of-00002.safetensors".into())
        );
        let weights = at8(Need::Weights);
        assert!(weights.contains(&"checkpoints/step-00000008/ranks.json".into()), "{weights:?}");
        assert!(weights.contains(&"checkpoints/step-00000008/model-rank-00000-of-00002.safetensors".into()));
        assert!(!weights.iter().any(|n| n.contains("optimizer")), "{weights:?}");
    }
}
