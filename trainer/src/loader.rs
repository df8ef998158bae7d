//! The shard loader behind the `BatchSource` seam, data sources from a config, and a writer
//! for a synthetic shard corpus (tests and benchmarks that need a real corpus on disk).

use std::path::{Path, PathBuf};

use motley_shards::{CorpusWriter, Loader, LoaderConfig, LoaderState, Source, Split, Vocab, WriterProperties};

use crate::config::DataConfig;
use crate::data::{BatchSource, SyntheticSource};
use crate::error::TrainError;

/// `motley_shards::Loader` over one or more corpora, restartable from a saved state.
#[derive(Debug)]
pub struct ShardSource {
    sources: Vec<Source>,
    cfg: LoaderConfig,
    loader: Loader,
    label: String,
}

impl ShardSource {
    /// Opens every corpus of `data`; a missing directory is an error naming it.
    pub fn open(
        data: &DataConfig,
        seed: u64,
        split: Split,
        rank: usize,
        world_size: usize,
    ) -> Result<Self, TrainError> {
        let label = data.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(",");
        if data.paths.is_empty() {
            return Err(TrainError::Data { path: "data.paths".into(), msg: "no corpus directory given".into() });
        }
        let mut sources = Vec::with_capacity(data.paths.len());
        for (i, p) in data.paths.iter().enumerate() {
            // Object-store locations (s3://…) are opened by the opener the binary registered.
            let remote = p.to_str().is_some_and(motley_shards::store::is_remote);
            if !remote && !p.is_dir() {
                return Err(TrainError::Data {
                    path: p.display().to_string(),
                    msg: "corpus directory does not exist".into(),
                });
            }
            let w = data.weights.get(i).copied().unwrap_or(1.0);
            let s = Source::open(p, w)
                .map_err(|e| TrainError::Data { path: p.display().to_string(), msg: e.to_string() })?;
            sources.push(s);
        }
        let cfg = LoaderConfig {
            seq_len: data.seq_len,
            batch_size: data.batch_size,
            seed,
            rank,
            world_size,
            local_rank: 0,
            split_segments: data.split_segments,
            prefetch: if split == Split::Eval { 0 } else { data.prefetch },
            split,
            eval_fraction: data.eval_fraction,
            shuffle: data.shuffle,
            shuffle_window: data.shuffle_window,
            index_dir: data.index_dir.clone(),
            ..LoaderConfig::default()
        };
        let loader = Loader::new(sources.clone(), cfg.clone())
            .map_err(|e| TrainError::Data { path: label.clone(), msg: e.to_string() })?;
        Ok(ShardSource { sources, cfg, loader, label })
    }
}

impl BatchSource for ShardSource {
    fn next_batch(&mut self) -> Result<motley_shards::Batch, TrainError> {
        self.loader.next_batch().map_err(|e| TrainError::Data { path: self.label.clone(), msg: e.to_string() })
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(self.loader.state()).unwrap_or(serde_json::Value::Null)
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), TrainError> {
        let err = |msg: String| TrainError::Data { path: self.label.clone(), msg };
        let st: LoaderState = serde_json::from_value(state.clone()).map_err(|e| err(format!("loader state: {e}")))?;
        // A checkpoint from before the block shuffle continues its global document shuffle
        // (its state has no `shuffle` field), so the run goes on with the same stream.
        let mut cfg = self.cfg.clone();
        if state.get("shuffle").is_none() {
            cfg.shuffle = motley_shards::Shuffle::Documents;
        }
        // Drop the old loader (and its prefetch thread) before starting the resumed one.
        let resumed = Loader::resume(self.sources.clone(), cfg, st).map_err(|e| err(e.to_string()))?;
        self.loader = resumed;
        Ok(())
    }

    fn vocab(&self) -> &Vocab {
        self.loader.vocab()
    }

    /// Per modality, the first corpus's file that exists (corpora of one run share a vocabulary;
    /// a remote corpus's files are in its cache folder).
    fn tokenizer_files(&self) -> Vec<(String, PathBuf)> {
        let mut out: Vec<(String, PathBuf)> = Vec::new();
        for s in &self.sources {
            for (m, rel) in s.corpus.manifest().tokenizer_files() {
                let path = s.corpus.dir().join(rel);
                if !out.iter().any(|(k, _)| k == m) && path.is_file() {
                    out.push((m.to_string(), path));
                }
            }
        }
        out
    }
}

/// Opens the train or eval stream a config describes (synthetic or shards). The eval split
/// is None when `eval_fraction` is 0.
pub fn open_source(
    data: &DataConfig,
    seed: u64,
    split: Split,
    rank: usize,
    world_size: usize,
) -> Result<Option<Box<dyn BatchSource>>, TrainError> {
    if split == Split::Eval && data.eval_fraction <= 0.0 {
        return Ok(None);
    }
    if data.synthetic {
        // Held-out synthetic documents come from another seed; ranks get their own streams.
        let s = match split {
            Split::Train => seed.wrapping_add(rank as u64 * 7919),
            Split::Eval => seed ^ 0x5EED_E7A1,
        };
        return Ok(Some(Box::new(SyntheticSource::new(s, data.batch_size, data.seq_len))));
    }
    Ok(Some(Box::new(ShardSource::open(data, seed, split, rank, world_size)?)))
}

/// Writes `docs` synthetic documents as a shard corpus in `dir` (with its manifest).
pub fn write_synthetic_corpus(dir: &Path, docs: u64, seed: u64) -> Result<(), TrainError> {
    write_synthetic(dir, docs, SyntheticSource::new(seed, 1, 2))
}

/// The same with images as continuous `dim`-wide patch vectors (Transfusion setting).
pub fn write_synthetic_corpus_latent(dir: &Path, docs: u64, seed: u64, dim: u32) -> Result<(), TrainError> {
    write_synthetic(dir, docs, SyntheticSource::new(seed, 1, 2).with_latent_images(dim))
}

fn write_synthetic(dir: &Path, docs: u64, synth: SyntheticSource) -> Result<(), TrainError> {
    let err = |e: motley_shards::ShardError| TrainError::Data { path: dir.display().to_string(), msg: e.to_string() };
    let mut w = CorpusWriter::create(dir, synth.vocab(), WriterProperties::default(), "synthetic").map_err(err)?;
    for i in 0..docs {
        w.add_document(&synth.document(i)).map_err(err)?;
    }
    w.finish_with_manifest().map_err(err)?;
    Ok(())
}
