//! The ingest run: plan → resume check → (dedup hashing) → parallel tasks → manifest.
//!
//! Each task writes its own shards (`task-NNNNN-MMM.mshard`, each renamed into place when
//! complete) and then, atomically, a completion marker `.ingest/task-NNNNN.done` holding the
//! shard stats, counters and skipped records. A re-run of the same command keeps every task
//! with a marker, deletes the leftovers of the others and runs them again; the manifest lists
//! the tasks' shards in task order, so the corpus equals an uninterrupted run's.
//!
//! Concurrency: `workers` task threads each stream one task (read → batch → encode → write),
//! and the encoding of a batch runs on a rayon pool of `workers` threads. At most `workers`
//! batches are alive at once, so memory is bounded whatever the corpus size.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use motley_shards::{CorpusWriter, Manifest, Modality, ShardStats, Vocab, WriterProperties};
use serde::{Deserialize, Serialize};

use crate::encode::{Tokenizers, content_hash};
use crate::error::{Error, RecordError, Result};
use crate::plan::{Part, Task, plan, select_part};
use crate::progress::Progress;
use crate::recipe::Recipe;
use crate::source::{RawRecord, ReadCtx, read_unit};

/// Directory inside the output that holds the run's plan and task markers.
pub const STATE_DIR: &str = ".ingest";
/// Skipped records of the whole corpus, one JSON object per line, in task order.
pub const ERRORS_FILE: &str = "errors.jsonl";
/// Where the tokenizer files are copied inside the corpus.
pub const TOKENIZERS_DIR: &str = "tokenizers";

/// Records encoded together (one `encode_batch` call, one parallel media map).
const BATCH_RECORDS: usize = 256;
/// A batch is also cut when its inline media bytes pass this (bounded memory).
const BATCH_BYTES: usize = 32 << 20;

/// Most task and encoding threads one run starts (`--workers`).
pub const MAX_WORKERS: usize = 4096;

/// Everything that shapes an ingest run.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// The recipe with absolute (or cwd-relative) paths and tokenizer paths resolved.
    pub recipe: Recipe,
    pub out: PathBuf,
    /// Task threads and encoding threads; None = all cores.
    pub workers: Option<usize>,
    /// Stop after this many documents (in task order; tasks then run one at a time).
    pub limit: Option<u64>,
    pub part: Part,
    /// Stop once more records than this were skipped.
    pub max_errors: Option<u64>,
    pub overwrite: bool,
    /// Draw progress bars on stderr.
    pub progress: bool,
    /// An object-store location (`s3://…`) the shards go to as each task finishes: uploaded,
    /// then deleted here, before the task's marker is written, so `out` never holds more than
    /// the running tasks' shards. The manifest (and tokenizers) are left to the caller, which
    /// uploads them last. A resume trusts an uploaded shard whose object has the marker's size.
    pub upload: Option<String>,
    /// Objects of an object-store input fetched ahead of the one a task is reading, in
    /// parallel (many small objects: one request's latency each); 0 fetches each when the task
    /// reaches it.
    pub fetch_ahead: usize,
}

/// Per-modality counts: sequence positions (tokens or latent vectors) and segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModalityCounts {
    pub text: u64,
    pub image: u64,
    pub speech: u64,
}

impl ModalityCounts {
    fn add(&mut self, m: Modality, n: u64) {
        match m {
            Modality::Text => self.text += n,
            Modality::Image => self.image += n,
            Modality::Speech => self.speech += n,
        }
    }
    fn merge(&mut self, o: &ModalityCounts) {
        self.text += o.text;
        self.image += o.image;
        self.speech += o.speech;
    }
    pub fn total(&self) -> u64 {
        self.text + self.image + self.speech
    }
}

/// The completion marker of one task (`.ingest/task-NNNNN.done`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMarker {
    pub task: u32,
    /// Fingerprint of the plan the task belongs to.
    pub fingerprint: String,
    pub shards: Vec<ShardStats>,
    pub records: u64,
    pub documents: u64,
    pub duplicates: u64,
    pub tokens: ModalityCounts,
    pub input_bytes: u64,
    pub errors: Vec<RecordError>,
}

/// What a run reports (also printed as JSON with `--json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub out: PathBuf,
    pub part: String,
    pub tasks: u64,
    /// Tasks found finished from an earlier run and skipped.
    pub tasks_resumed: u64,
    pub tasks_run: u64,
    pub records: u64,
    pub documents: u64,
    /// Sequence positions per modality (tokens; latent patch vectors for latent images).
    pub tokens: ModalityCounts,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub shards: u64,
    pub duplicates: u64,
    pub errors: u64,
    pub errors_by_reason: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// Throughput of the work done by this invocation.
    pub docs_per_s: f64,
    pub tokens_per_s: f64,
    pub input_mb_per_s: f64,
    pub tokenizers: BTreeMap<String, String>,
}

/// `.ingest/plan.json`: what the output was (being) built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PlanFile {
    fingerprint: String,
    part: Part,
    tasks: Vec<u32>,
}

fn state_dir(out: &Path) -> PathBuf {
    out.join(STATE_DIR)
}

fn marker_path(out: &Path, task: u32) -> PathBuf {
    state_dir(out).join(format!("task-{task:05}.done"))
}

fn hashes_path(out: &Path, task: u32) -> PathBuf {
    state_dir(out).join(format!("task-{task:05}.hashes"))
}

/// Writes `path` atomically: temporary file, fsync, rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e))
}

fn shard_err(out: &Path, e: impl std::fmt::Display) -> Error {
    Error::Shards { path: out.to_path_buf(), message: e.to_string() }
}

/// `MOTLEY_FAILPOINT`: `after_task:N` exits the process right after the N-th task of this
/// process wrote its marker; `mid_task:N` exits in the middle of the N-th task (after its first
/// batch was written, before its marker). For kill-and-resume tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failpoint {
    AfterTask(usize),
    MidTask(usize),
}

fn failpoint() -> Option<Failpoint> {
    let v = std::env::var("MOTLEY_FAILPOINT").ok()?;
    let (k, n) = v.split_once(':')?;
    let n: usize = n.trim().parse().ok()?;
    match k.trim() {
        "after_task" => Some(Failpoint::AfterTask(n)),
        "mid_task" => Some(Failpoint::MidTask(n)),
        _ => None,
    }
}

fn die_at_failpoint(what: &str) -> ! {
    eprintln!("MOTLEY_FAILPOINT: exiting abruptly at {what}");
    // Like a kill: no cleanup, no destructors.
    std::process::exit(86)
}

/// Shared state of the running tasks.
struct Shared<'a> {
    cfg: &'a IngestConfig,
    toks: &'a Tokenizers,
    vocab: &'a Vocab,
    pool: &'a rayon::ThreadPool,
    fingerprint: &'a str,
    errors: AtomicU64,
    stop: AtomicBool,
    started: AtomicUsize,
    finished: AtomicUsize,
    failpoint: Option<Failpoint>,
    progress: &'a Progress,
    /// Errors of tasks that were cut short (reported even though the task has no marker).
    orphan_errors: Mutex<Vec<(u32, RecordError)>>,
}

impl Shared<'_> {
    /// Counts one skipped record; false once `--max-errors` is exceeded.
    fn count_error(&self) -> bool {
        let n = self.errors.fetch_add(1, Ordering::SeqCst) + 1;
        self.progress.error();
        if self.cfg.max_errors.is_some_and(|m| n > m) {
            self.stop.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }
}

/// Runs one task to its marker. `budget` caps its documents (`--limit`); `drop` lists
/// (unit, record) pairs that are duplicates of earlier records.
fn run_task(
    sh: &Shared<'_>,
    task: &Task,
    budget: Option<u64>,
    drop: &BTreeSet<(u32, u64)>,
) -> Result<Option<TaskMarker>> {
    let cfg = sh.cfg;
    let nth = sh.started.fetch_add(1, Ordering::SeqCst) + 1;
    let props = WriterProperties::builder()
        .max_shard_bytes(cfg.recipe.options.shard_mib << 20)
        .compression(cfg.recipe.options.compression.unwrap_or(motley_shards::Compression::Raw))
        .build();
    let mut writer =
        CorpusWriter::create(&cfg.out, sh.vocab, props, &task.name()).map_err(|e| shard_err(&cfg.out, e))?;
    let spec = &cfg.recipe.sources[task.source];
    let ctx = ReadCtx { spec, options: &cfg.recipe.options };
    let mut m = TaskMarker {
        task: task.id,
        fingerprint: sh.fingerprint.to_string(),
        shards: Vec::new(),
        records: 0,
        documents: 0,
        duplicates: 0,
        tokens: ModalityCounts::default(),
        input_bytes: task.bytes(),
        errors: Vec::new(),
    };
    let mut batch: Vec<RawRecord> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut fatal: Option<Error> = None;
    let mut aborted = false;

    // Encodes and writes the pending batch; Break when the task must stop.
    let mut flush = |batch: &mut Vec<RawRecord>, m: &mut TaskMarker, fatal: &mut Option<Error>| -> ControlFlow<()> {
        if batch.is_empty() {
            return ControlFlow::Continue(());
        }
        let docs = sh.pool.install(|| sh.toks.encode(batch));
        let mut cont = ControlFlow::Continue(());
        for d in docs {
            if budget.is_some_and(|b| m.documents >= b) {
                cont = ControlFlow::Break(());
                break;
            }
            match d {
                Ok(doc) => {
                    if let Err(e) = writer.add_document(&doc) {
                        *fatal = Some(shard_err(&cfg.out, e));
                        return ControlFlow::Break(());
                    }
                    let mut per = ModalityCounts::default();
                    for s in &doc.segments {
                        per.add(s.modality, s.data.len() as u64);
                    }
                    m.tokens.merge(&per);
                    m.documents += 1;
                    sh.progress.document(&per);
                }
                Err(e) => {
                    m.errors.push(e);
                    if !sh.count_error() {
                        cont = ControlFlow::Break(());
                    }
                }
            }
        }
        batch.clear();
        if sh.failpoint == Some(Failpoint::MidTask(nth)) {
            die_at_failpoint(&format!("the middle of task {}", task.id));
        }
        if budget.is_some_and(|b| m.documents >= b) {
            cont = ControlFlow::Break(());
        }
        cont
    };

    crate::remote_input::fetch_ahead(&task.units, cfg.fetch_ahead, |ready| {
        'units: for (ui, unit) in task.units.iter().enumerate() {
            // An object-store input is fetched when its task reaches it, or ahead of that (a
            // network failure stops the run, which resumes here, rather than costing the task
            // its records).
            if let Err(e) = ready(ui) {
                fatal = Some(e);
                break 'units;
            }
            let flow = read_unit(&ctx, unit, &mut |item| {
                if sh.stop.load(Ordering::Relaxed) {
                    aborted = true;
                    return ControlFlow::Break(());
                }
                m.records += 1;
                match item {
                    Err(e) => {
                        m.errors.push(e);
                        if !sh.count_error() {
                            aborted = true;
                            return ControlFlow::Break(());
                        }
                    }
                    Ok(r) => {
                        if drop.contains(&(ui as u32, r.index)) {
                            m.duplicates += 1;
                            return ControlFlow::Continue(());
                        }
                        batch_bytes += r.parts.iter().map(part_bytes).sum::<usize>();
                        batch.push(r);
                        if batch.len() >= BATCH_RECORDS || batch_bytes >= BATCH_BYTES {
                            batch_bytes = 0;
                            return flush(&mut batch, &mut m, &mut fatal);
                        }
                    }
                }
                ControlFlow::Continue(())
            });
            sh.progress.bytes(unit.bytes);
            crate::remote_input::release(unit);
            if flow.is_break() {
                break 'units;
            }
        }
    });
    if fatal.is_none() && !aborted && !sh.stop.load(Ordering::Relaxed) {
        let _ = flush(&mut batch, &mut m, &mut fatal);
    }
    if let Some(e) = fatal {
        return Err(e);
    }
    if aborted || sh.stop.load(Ordering::Relaxed) {
        // Cut short by --max-errors: no marker; the unfinished shards are removed on resume.
        let mut o = sh.orphan_errors.lock().unwrap_or_else(|p| p.into_inner());
        o.extend(m.errors.into_iter().map(|e| (task.id, e)));
        return Ok(None);
    }
    m.shards = writer.finish().map_err(|e| shard_err(&cfg.out, e))?;
    if let Some(uri) = &cfg.upload {
        for s in &m.shards {
            crate::remote_input::upload_shard(&cfg.out.join(&s.name), uri, &s.name)?;
        }
    }
    // Reader errors are seen before encoding errors of the same batch: list them in input order.
    let unit_of =
        |file: &str| task.units.iter().position(|u| u.file.display().to_string() == file).unwrap_or(usize::MAX);
    m.errors.sort_by_cached_key(|e| (unit_of(&e.file), e.record));
    // Errors in a fetched object name the object, not its place in the cache.
    for e in &mut m.errors {
        if let Some(r) =
            task.units.iter().find(|u| u.file.display().to_string() == e.file).and_then(|u| u.remote.as_ref())
        {
            e.file = r.uri.clone();
        }
    }
    let json = serde_json::to_vec(&m)
        .map_err(|e| Error::Marker { path: marker_path(&cfg.out, task.id), message: e.to_string() })?;
    write_atomic(&marker_path(&cfg.out, task.id), &json)?;
    let done = sh.finished.fetch_add(1, Ordering::SeqCst) + 1;
    sh.progress.task_done();
    if sh.failpoint == Some(Failpoint::AfterTask(done)) {
        die_at_failpoint(&format!("after task {} ({done} finished)", task.id));
    }
    Ok(Some(m))
}

fn part_bytes(p: &crate::source::RawPart) -> usize {
    match p {
        crate::source::RawPart::Text(t) => t.len(),
        crate::source::RawPart::Image(crate::source::Blob::Bytes { data, .. })
        | crate::source::RawPart::Audio(crate::source::Blob::Bytes { data, .. }) => data.len(),
        _ => 256,
    }
}

fn read_marker(
    out: &Path,
    task: u32,
    fingerprint: &str,
    vocab: &Vocab,
    uploaded: Option<&HashMap<String, u64>>,
) -> Option<TaskMarker> {
    let bytes = std::fs::read(marker_path(out, task)).ok()?;
    let m: TaskMarker = serde_json::from_slice(&bytes).ok()?;
    // A marker is only trusted if every shard it lists is still there and its footer agrees
    // with the marker (size, documents, chunks, payload, per-modality counts, vocabulary):
    // the manifest is built from markers, so a truncated shard or an edited marker would make
    // a corpus that `shards verify` refuses. Reading footers costs no payload pass; a flipped
    // payload byte is left to `shards verify`'s checksums. An untrusted task is run again.
    // Shards uploaded as their task finished are no longer here: their objects must have the
    // marker's sizes (`shards verify` checks their bytes).
    let shards_agree = || {
        m.shards.iter().all(|s| match uploaded {
            Some(there) => there.get(&s.name) == Some(&s.bytes),
            None => {
                motley_shards::ShardReader::open(out.join(&s.name)).is_ok_and(|r| r.check_against(s, vocab).is_ok())
            }
        })
    };
    let documents: u64 = m.shards.iter().map(|s| s.num_docs).sum();
    let ok = m.task == task && m.fingerprint == fingerprint && m.documents == documents && shards_agree();
    ok.then_some(m)
}

/// The task a shard file belongs to: `task-NNNNN-MMM.mshard` (or `.tmp`) gives NNNNN. Ids
/// are written with at least five digits and more past 99,999, so all digits up to the `-`
/// are the id (`task-100000-000` is task 100000, not task 10000).
fn task_of_file(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("task-")?;
    let (digits, tail) = rest.split_once('-')?;
    let plausible = digits.len() >= 5 && digits.bytes().all(|b| b.is_ascii_digit()) && tail.contains(".mshard");
    plausible.then(|| digits.parse().ok()).flatten()
}

/// Removes the files a task may have left behind when it was killed.
fn clear_task_leftovers(out: &Path, pending: &HashSet<u32>) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let entries = std::fs::read_dir(out).map_err(|e| Error::io("list", out, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io("list", out, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = task_of_file(&name) else { continue };
        if pending.contains(&id) {
            std::fs::remove_file(e.path()).map_err(|err| Error::io("remove leftover", e.path(), err))?;
        }
    }
    Ok(())
}

/// Hex blake3 of a file or of all files of a directory (name + content, sorted).
fn hash_path(p: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let mut files = Vec::new();
    if p.is_dir() {
        for e in std::fs::read_dir(p).map_err(|e| Error::io("list", p, e))? {
            files.push(e.map_err(|e| Error::io("list", p, e))?.path());
        }
        files.sort();
    } else {
        files.push(p.to_path_buf());
    }
    for f in files.iter().filter(|f| f.is_file()) {
        h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        let mut file = std::fs::File::open(f).map_err(|e| Error::io("open", f, e))?;
        std::io::copy(&mut file, &mut h).map_err(|e| Error::io("read", f, e))?;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The file inside `.ingest/` that a running ingest holds an exclusive lock on.
pub const LOCK_FILE: &str = "lock";

/// An ingest's exclusive hold on its output directory: an OS lock on `.ingest/lock`, released
/// when this is dropped or the process ends however it ends (a killed run leaves no stale lock).
#[derive(Debug)]
pub struct OutputLock {
    _file: std::fs::File,
}

/// Takes the lock of `out`, creating `out/.ingest/` if needed; another holder is an error.
pub fn lock_output(out: &Path) -> Result<OutputLock> {
    let state = state_dir(out);
    std::fs::create_dir_all(&state).map_err(|e| Error::io("create", &state, e))?;
    let path = state.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(OutputLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked { path: out.to_path_buf(), lock: path }),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}

/// Entries of `dir` (none when it does not exist), leaving out `.ingest/lock`.
fn entries_besides_lock(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let p = e.map_err(|e| Error::io("list", dir, e))?.path();
        if p.file_name().is_some_and(|n| n == STATE_DIR) {
            for e in std::fs::read_dir(&p).map_err(|e| Error::io("list", &p, e))? {
                let q = e.map_err(|e| Error::io("list", &p, e))?.path();
                if q.file_name().is_none_or(|n| n != LOCK_FILE) {
                    v.push(q);
                }
            }
        } else {
            v.push(p);
        }
    }
    Ok(v)
}

/// Prepares the output directory: fresh, resumable, or refused. Returns the output's lock,
/// which the run holds to its end, so a second ingest into the same `--out` refuses instead of
/// writing the same files (`Error::Locked`).
fn prepare_out(cfg: &IngestConfig, plan_file: &PlanFile) -> Result<OutputLock> {
    let out = &cfg.out;
    let manifest = out.join(motley_shards::MANIFEST_NAME);
    let state = state_dir(out);
    let plan_path = state.join("plan.json");
    // A directory that is neither a corpus nor an ingest's: refused before anything is written
    // into it (the lock included).
    if !manifest.exists() && !state.exists() && !entries_besides_lock(out)?.is_empty() {
        return Err(Error::NotACorpus { path: out.clone() });
    }
    let lock = lock_output(out)?;
    // Decided under the lock, from what is there now.
    let existing_files = entries_besides_lock(out)?;
    if !existing_files.is_empty() {
        let existing: Option<PlanFile> = std::fs::read(&plan_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let same = existing.as_ref() == Some(plan_file);
        let finished = manifest.exists();
        if same && !finished {
            return Ok(lock); // resume
        }
        if !cfg.overwrite {
            let what = if finished { "a corpus" } else { "an unfinished ingest of a different command" };
            return Err(Error::OutputExists { path: out.clone(), what: what.into() });
        }
        // Everything but the lock goes: removing the directory would let another run lock
        // a new file of the same name while this one still writes.
        for p in existing_files {
            let removed = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            removed.map_err(|e| Error::io("remove", &p, e))?;
        }
    }
    write_atomic(&plan_path, &serde_json::to_vec_pretty(plan_file).unwrap_or_default())?;
    Ok(lock)
}

/// Copies the tokenizer files into `out/tokenizers/` (`text.json`, `image.safetensors`,
/// `speech.safetensors`); returns (modality, path inside the corpus).
fn copy_tokenizers(out: &Path, toks: &Tokenizers) -> Result<Vec<(Modality, String)>> {
    let mut v = Vec::new();
    for (m, src) in toks.files() {
        // Fixed names, so readers (`motley shards decode`) find them without the manifest too.
        let rel = match m {
            Modality::Text => format!("{TOKENIZERS_DIR}/text.json"),
            _ => format!("{TOKENIZERS_DIR}/{}.safetensors", m.as_str()),
        };
        let dst = out.join(&rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
        }
        let tok_err =
            |e: motley_tokenizers::TokenizerError| Error::Tokenizer { path: src.clone(), message: e.to_string() };
        match (&toks.image, &toks.speech, m) {
            // A model folder becomes one tokenizer file (its weights unchanged, plus a header).
            (Some((tok, _)), _, Modality::Image) if src.is_dir() => tok.save(&dst).map_err(tok_err)?,
            (_, Some((tok, _)), Modality::Speech) if src.is_dir() => tok.save(&dst).map_err(tok_err)?,
            _ => {
                let bytes = std::fs::read(&src).map_err(|e| Error::io("read tokenizer", &src, e))?;
                write_atomic(&dst, &bytes)?;
            }
        }
        v.push((m, rel));
    }
    Ok(v)
}

/// Dedup pass: hashes every record of the tasks (kept per task in `.ingest/`, so a resumed
/// run does not rehash) and returns, per task, the (unit, record) pairs that repeat an earlier
/// record in corpus order.
fn dedup_plan(sh: &Shared<'_>, tasks: &[Task]) -> Result<BTreeMap<u32, BTreeSet<(u32, u64)>>> {
    type Entry = (u32, u64, [u8; 16]);
    let out = &sh.cfg.out;
    let next = AtomicUsize::new(0);
    let results: Mutex<BTreeMap<u32, Vec<Entry>>> = Mutex::new(BTreeMap::new());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let workers = sh.pool.current_num_threads();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(task) = tasks.get(i) else { break };
                    let path = hashes_path(out, task.id);
                    let entries = match std::fs::read(&path) {
                        Ok(b) if b.len() % 28 == 0 => b
                            .chunks_exact(28)
                            .map(|c| {
                                let mut h = [0u8; 16];
                                h.copy_from_slice(&c[12..]);
                                let u = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                                let mut r = [0u8; 8];
                                r.copy_from_slice(&c[4..12]);
                                (u, u64::from_le_bytes(r), h)
                            })
                            .collect(),
                        _ => {
                            let spec = &sh.cfg.recipe.sources[task.source];
                            let ctx = ReadCtx { spec, options: &sh.cfg.recipe.options };
                            let mut v: Vec<Entry> = Vec::new();
                            for (ui, unit) in task.units.iter().enumerate() {
                                if let Err(e) = crate::remote_input::ensure_local(&unit.file, unit.remote.as_ref()) {
                                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                                    return;
                                }
                                let _ = read_unit(&ctx, unit, &mut |item| {
                                    if let Ok(r) = item
                                        && let Ok(h) = content_hash(&r)
                                    {
                                        v.push((ui as u32, r.index, h));
                                    }
                                    ControlFlow::Continue(())
                                });
                                crate::remote_input::release(unit);
                            }
                            let mut bytes = Vec::with_capacity(v.len() * 28);
                            for (u, r, h) in &v {
                                bytes.extend_from_slice(&u.to_le_bytes());
                                bytes.extend_from_slice(&r.to_le_bytes());
                                bytes.extend_from_slice(h);
                            }
                            if let Err(e) = write_atomic(&path, &bytes) {
                                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                                break;
                            }
                            v
                        }
                    };
                    results.lock().unwrap_or_else(|p| p.into_inner()).insert(task.id, entries);
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut seen: HashSet<[u8; 16]> = HashSet::new();
    let mut drops = BTreeMap::new();
    for (task, entries) in results {
        let mut d = BTreeSet::new();
        for (u, r, h) in entries {
            if !seen.insert(h) {
                d.insert((u, r));
            }
        }
        drops.insert(task, d);
    }
    Ok(drops)
}

/// Runs an ingest to a finished corpus (or resumes one).
pub fn ingest(cfg: &IngestConfig) -> Result<Summary> {
    let start = Instant::now();
    cfg.recipe.validate().map_err(|message| Error::Recipe { path: PathBuf::from("<recipe>"), message })?;
    // Thread creation would take minutes (and the memory of their stacks) before failing.
    if cfg.workers.is_some_and(|w| w > MAX_WORKERS) {
        return Err(Error::Options(format!("workers must be at most {MAX_WORKERS}")));
    }
    let all = plan(&cfg.recipe)?;
    let tasks = select_part(&all, cfg.part);
    let toks =
        Tokenizers::load(&cfg.recipe.tokenizers, cfg.recipe.tokenizers_to_load(), cfg.recipe.options.image_mode)?;

    // The fingerprint pins everything that decides the corpus's bytes.
    let mut fp = blake3::Hasher::new();
    fp.update(b"motley-ingest/1");
    fp.update(&serde_json::to_vec(&cfg.recipe.sources).unwrap_or_default());
    fp.update(&serde_json::to_vec(&cfg.recipe.options).unwrap_or_default());
    fp.update(&serde_json::to_vec(&tasks).unwrap_or_default());
    fp.update(&serde_json::to_vec(&(cfg.limit, cfg.part)).unwrap_or_default());
    for (m, p) in toks.files() {
        fp.update(m.as_str().as_bytes());
        fp.update(hash_path(&p)?.as_bytes());
    }
    let fingerprint = fp.finalize().to_hex().to_string();
    let plan_file =
        PlanFile { fingerprint: fingerprint.clone(), part: cfg.part, tasks: tasks.iter().map(|t| t.id).collect() };
    let _lock = prepare_out(cfg, &plan_file)?;
    let tok_files = copy_tokenizers(&cfg.out, &toks)?;
    let vocab = toks.vocab(&tok_files);

    let uploaded = cfg.upload.as_deref().map(crate::remote_input::uploaded).transpose()?;
    let mut done: BTreeMap<u32, TaskMarker> = BTreeMap::new();
    for t in &tasks {
        if let Some(m) = read_marker(&cfg.out, t.id, &fingerprint, &vocab, uploaded.as_ref()) {
            done.insert(t.id, m);
        }
    }
    let pending: Vec<&Task> = tasks.iter().filter(|t| !done.contains_key(&t.id)).collect();
    clear_task_leftovers(&cfg.out, &pending.iter().map(|t| t.id).collect())?;

    let workers = cfg.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("ingest-{i}"))
        .build()
        .map_err(|e| Error::Options(format!("cannot start {workers} worker threads: {e}")))?;
    let progress =
        Progress::new(cfg.progress, tasks.len() as u64, done.len() as u64, pending.iter().map(|t| t.bytes()).sum());
    let resumed_errors: u64 = done.values().map(|m| m.errors.len() as u64).sum();
    let sh = Shared {
        cfg,
        toks: &toks,
        vocab: &vocab,
        pool: &pool,
        fingerprint: &fingerprint,
        errors: AtomicU64::new(resumed_errors),
        stop: AtomicBool::new(cfg.max_errors.is_some_and(|m| resumed_errors > m)),
        started: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        failpoint: failpoint(),
        progress: &progress,
        orphan_errors: Mutex::new(Vec::new()),
    };

    let drops = if cfg.recipe.options.dedup { dedup_plan(&sh, &tasks)? } else { BTreeMap::new() };
    let no_drops = BTreeSet::new();
    let new_markers: Mutex<BTreeMap<u32, TaskMarker>> = Mutex::new(BTreeMap::new());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    if let Some(limit) = cfg.limit {
        // --limit: tasks in order, one at a time, each with what is left of the budget.
        let mut used: u64 = 0;
        for t in &tasks {
            if used >= limit || sh.stop.load(Ordering::SeqCst) {
                break;
            }
            if let Some(m) = done.get(&t.id) {
                used += m.documents;
                continue;
            }
            match run_task(&sh, t, Some(limit - used), drops.get(&t.id).unwrap_or(&no_drops))? {
                Some(m) => {
                    used += m.documents;
                    new_markers.lock().unwrap_or_else(|p| p.into_inner()).insert(t.id, m);
                }
                None => break,
            }
        }
    } else {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..workers.min(pending.len()) {
                s.spawn(|| {
                    loop {
                        if sh.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(t) = pending.get(i) else { break };
                        match run_task(&sh, t, None, drops.get(&t.id).unwrap_or(&no_drops)) {
                            Ok(Some(m)) => {
                                new_markers.lock().unwrap_or_else(|p| p.into_inner()).insert(t.id, m);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                sh.stop.store(true, Ordering::SeqCst);
                                failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            }
                        }
                    }
                });
            }
        });
    }
    progress.finish();
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let new_markers = new_markers.into_inner().unwrap_or_else(|p| p.into_inner());
    let tasks_run = new_markers.len() as u64;
    done.extend(new_markers.clone());

    // errors.jsonl: finished tasks in task order, then records of tasks cut short.
    let mut errors_text = Vec::new();
    for m in done.values() {
        for e in &m.errors {
            serde_json::to_writer(&mut errors_text, e)
                .map_err(|e| Error::Marker { path: cfg.out.clone(), message: e.to_string() })?;
            errors_text.push(b'\n');
        }
    }
    let orphans = sh.orphan_errors.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut orphans = orphans;
    orphans.sort_by_key(|(t, _)| *t);
    for (_, e) in &orphans {
        serde_json::to_writer(&mut errors_text, e)
            .map_err(|e| Error::Marker { path: cfg.out.clone(), message: e.to_string() })?;
        errors_text.push(b'\n');
    }
    write_atomic(&cfg.out.join(ERRORS_FILE), &errors_text)?;
    let total_errors = sh.errors.load(Ordering::SeqCst);
    if let Some(max) = cfg.max_errors
        && total_errors > max
    {
        return Err(Error::TooManyErrors { errors: total_errors, max, out: cfg.out.clone() });
    }

    // The manifest: every finished task's shards in task order.
    let shards: Vec<ShardStats> = done.values().flat_map(|m| m.shards.iter().cloned()).collect();
    let mut manifest = Manifest::from_stats(vocab.clone(), shards);
    let mut tokenizers = BTreeMap::new();
    for (m, rel) in &tok_files {
        tokenizers.insert(m.as_str().to_string(), rel.clone());
        // A pretrained model also records what it is and the factors its latents carry.
        let info = match (m, &toks.image, &toks.speech) {
            (Modality::Image, Some((t, _)), _) => t.manifest_info(),
            (Modality::Speech, _, Some((t, _))) => t.manifest_info(),
            _ => None,
        };
        let entry = match info {
            Some(serde_json::Value::Object(mut o)) => {
                o.insert("file".into(), serde_json::Value::String(rel.clone()));
                serde_json::Value::Object(o)
            }
            _ => serde_json::Value::String(rel.clone()),
        };
        manifest.tokenizers.insert(m.as_str().to_string(), entry);
    }
    let summary = summarize(cfg, &tasks, &done, &new_markers, tokenizers, start.elapsed().as_secs_f64());
    manifest.extra.insert(
        "ingest".into(),
        serde_json::json!({
            "fingerprint": fingerprint,
            "part": cfg.part.to_string(),
            "tasks": tasks.len(),
            "sources": cfg.recipe.sources.iter().enumerate().map(|(i, s)| s.display_name(i)).collect::<Vec<_>>(),
            "records": summary.records,
            "errors": summary.errors,
            "errors_by_reason": summary.errors_by_reason,
            "duplicates": summary.duplicates,
            "limit": cfg.limit,
        }),
    );
    manifest.write(&cfg.out).map_err(|e| shard_err(&cfg.out, e))?;
    Ok(Summary { tasks_run, ..summary })
}

fn summarize(
    cfg: &IngestConfig,
    tasks: &[Task],
    done: &BTreeMap<u32, TaskMarker>,
    new: &BTreeMap<u32, TaskMarker>,
    tokenizers: BTreeMap<String, String>,
    elapsed_s: f64,
) -> Summary {
    let mut tokens = ModalityCounts::default();
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    let (mut records, mut documents, mut input_bytes, mut output_bytes, mut shards, mut dups, mut errors) =
        (0, 0, 0, 0, 0, 0, 0);
    for m in done.values() {
        tokens.merge(&m.tokens);
        records += m.records;
        documents += m.documents;
        input_bytes += m.input_bytes;
        output_bytes += m.shards.iter().map(|s| s.bytes).sum::<u64>();
        shards += m.shards.len() as u64;
        dups += m.duplicates;
        errors += m.errors.len() as u64;
        for e in &m.errors {
            *by_reason.entry(e.reason.as_str().to_string()).or_default() += 1;
        }
    }
    let secs = elapsed_s.max(1e-9);
    let new_docs: u64 = new.values().map(|m| m.documents).sum();
    let new_tokens: u64 = new.values().map(|m| m.tokens.total()).sum();
    let new_bytes: u64 = new.values().map(|m| m.input_bytes).sum();
    Summary {
        out: cfg.out.clone(),
        part: cfg.part.to_string(),
        tasks: tasks.len() as u64,
        tasks_resumed: (done.len() - new.len()) as u64,
        tasks_run: new.len() as u64,
        records,
        documents,
        tokens,
        input_bytes,
        output_bytes,
        shards,
        duplicates: dups,
        errors,
        errors_by_reason: by_reason,
        elapsed_s,
        docs_per_s: new_docs as f64 / secs,
        tokens_per_s: new_tokens as f64 / secs,
        input_mb_per_s: new_bytes as f64 / secs / 1e6,
        tokenizers,
    }
}

/// Reads `errors.jsonl` of an ingest output (in report order).
pub fn read_errors(out: &Path) -> Result<Vec<RecordError>> {
    let path = out.join(ERRORS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| Error::Marker { path: path.clone(), message: e.to_string() }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_task_ids_past_99999_are_told_apart() -> anyhow::Result<()> {
        assert_eq!(task_of_file("task-00017-000.mshard"), Some(17));
        assert_eq!(task_of_file("task-10000-001.mshard.tmp"), Some(10000));
        assert_eq!(task_of_file("task-100000-000.mshard"), Some(100_000));
        assert_eq!(task_of_file("task-1234567-002.mshard"), Some(1_234_567));
        assert_eq!(task_of_file("task-1x000-000.mshard"), None);
        assert_eq!(task_of_file("task-00017.done"), None);
        let dir = tempfile::tempdir()?;
        let names =
            ["task-10000-000.mshard", "task-10000-001.mshard.tmp", "task-100000-000.mshard", "task-100001-000.mshard"];
        for n in names {
            std::fs::write(dir.path().join(n), b"x")?;
        }
        // Task 10000 was cut short and reruns; tasks 100000 and 100001 finished and stay.
        clear_task_leftovers(dir.path(), &HashSet::from([10000]))?;
        let mut left: Vec<String> = std::fs::read_dir(dir.path())?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        left.sort();
        assert_eq!(left, ["task-100000-000.mshard", "task-100001-000.mshard"]);
        clear_task_leftovers(dir.path(), &HashSet::from([100_001]))?;
        assert!(dir.path().join("task-100000-000.mshard").exists());
        assert!(!dir.path().join("task-100001-000.mshard").exists());
        Ok(())
    }
}
