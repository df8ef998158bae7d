//! Shared helpers of the ingest integration tests: small real tokenizers fitted once per test
//! process on the bundled sample data and the fixtures, and corpus readers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use indicatif::ProgressBar;
use motley_ingest::{IngestConfig, Recipe};
use motley_shards::{Corpus, Document};
use motley_tokenizers::{
    Fit, LatentConfig, LatentImageTokenizer, SpeechConfig, SpeechTokenizer, TextTokenizer, TextTrainConfig, VqConfig,
    VqImageTokenizer,
};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A tokenizers directory laid out like `motley tokenizer ... --out DIR/...` writes it:
/// `text.json`, `image/vq.safetensors` (+ `image/latent.safetensors`), `speech/units.safetensors`.
pub fn tokenizers_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // A child process of a kill-and-resume test reuses its parent's tokenizers.
        if let Ok(d) = std::env::var("MOTLEY_TEST_TOKENIZERS") {
            return PathBuf::from(d);
        }
        let dir = std::env::temp_dir().join(format!("motley-ingest-tests-tok-{}", std::process::id()));
        build_tokenizers(&dir).expect("fit test tokenizers");
        dir
    })
}

fn build_tokenizers(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("image"))?;
    std::fs::create_dir_all(dir.join("speech"))?;
    let text_files = vec![repo().join("data/sample/text/devils_dictionary.txt")];
    let (text, _) = TextTokenizer::train(&text_files, &TextTrainConfig { vocab_size: 400, ..Default::default() })?;
    text.save(dir.join("text.json"))?;
    let images: Vec<PathBuf> = (0..40).map(|i| repo().join(format!("data/sample/images/{i:05}.png"))).collect();
    let quiet = ProgressBar::hidden();
    let vq_cfg = VqConfig { codebook_size: 16, max_iter: 5, holdout: 0.0, ..Default::default() };
    let (vq, _) = <VqImageTokenizer as Fit>::fit(&images, &vq_cfg, &quiet)?;
    motley_tokenizers::ImageTokenizer::save(&vq, &dir.join("image/vq.safetensors"))?;
    let lat_cfg = LatentConfig { dim: Some(8), holdout: 0.0, ..Default::default() };
    let (lat, _) = <LatentImageTokenizer as Fit>::fit(&images, &lat_cfg, &quiet)?;
    motley_tokenizers::ImageTokenizer::save(&lat, &dir.join("image/latent.safetensors"))?;
    let audio: Vec<PathBuf> = ["zero_t0_us.wav", "zero_t0_gb.wav", "zero_t0_sc.flac"]
        .iter()
        .map(|f| repo().join("data/sample/speech").join(f))
        .collect();
    let sp_cfg = SpeechConfig { units: 16, max_iter: 5, ..Default::default() };
    let (sp, _) = <SpeechTokenizer as Fit>::fit(&audio, &sp_cfg, &quiet)?;
    sp.save(dir.join("speech/units.safetensors"))?;
    Ok(())
}

/// A config with test defaults (two workers, no progress bars).
pub fn config(recipe: Recipe, out: &Path) -> IngestConfig {
    let mut recipe = recipe;
    recipe.locate_tokenizers(tokenizers_dir());
    IngestConfig {
        recipe,
        out: out.to_path_buf(),
        workers: Some(2),
        limit: None,
        part: Default::default(),
        max_errors: None,
        overwrite: false,
        progress: false,
        upload: None,
        fetch_ahead: 4,
    }
}

/// Parses recipe text whose relative paths are relative to `base`.
pub fn recipe(toml: &str, base: &Path) -> Recipe {
    let mut r = Recipe::from_toml(toml).expect("valid test recipe");
    r.rebase(base);
    r
}

/// Every document of a corpus, in order.
pub fn documents(dir: &Path) -> Vec<Document> {
    let c = Corpus::open(dir).expect("open corpus");
    (0..c.num_docs()).map(|i| c.get(i).expect("doc").to_owned()).collect()
}

/// All files of a corpus dir (relative name → bytes), the run state excluded.
pub fn corpus_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    fn walk(base: &Path, d: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).expect("list") {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(base).expect("prefix").to_string_lossy().into_owned();
            if rel.starts_with(".ingest") {
                continue;
            }
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}
