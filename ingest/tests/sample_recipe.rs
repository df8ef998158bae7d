//! The bundled sample corpus ingests end to end from data/sample/recipe.toml with
//! `--tokenizers DIR`, every source contributing and the tokenizers recorded in the manifest.

mod common;

use motley_ingest::{Recipe, ingest};
use motley_shards::{Corpus, Modality};

#[test]
fn sample_recipe_ingests_end_to_end() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("corpus");
    let recipe = Recipe::from_file(&common::repo().join("data/sample/recipe.toml"))?;
    let mut cfg = common::config(recipe, &out);
    cfg.workers = None;
    let s = ingest(&cfg)?;
    assert_eq!(s.errors, 0, "{:?}", s.errors_by_reason);
    assert_eq!(s.documents, s.records);
    assert!(s.tokens.text > 0 && s.tokens.image > 0 && s.tokens.speech > 0, "{:?}", s.tokens);
    let corpus = Corpus::open(&out)?;
    assert_eq!(corpus.num_docs(), s.documents);
    let report = corpus.verify();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.docs, s.documents);
    let m = corpus.manifest();
    for (name, file) in [
        ("text", "tokenizers/text.json"),
        ("image", "tokenizers/image.safetensors"),
        ("speech", "tokenizers/speech.safetensors"),
    ] {
        assert_eq!(m.tokenizers.get(name).and_then(|v| v.as_str()), Some(file));
        assert!(out.join(file).is_file(), "{file} copied into the corpus");
    }
    // The last source is interleaved: its documents mix all three modalities.
    let last = corpus.get(corpus.num_docs() - 1)?.to_owned();
    let kinds: std::collections::BTreeSet<Modality> = last.segments.iter().map(|s| s.modality).collect();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    Ok(())
}

/// The study's four part recipes (data/sample/study/) give corpora with one shared vocabulary
/// in both image modes, so the loader can mix them by weight; without `all_tokenizers` the
/// text part's vocabulary would lack the image and speech blocks and the loader would refuse.
#[test]
fn study_part_recipes_share_one_vocabulary_and_mix() -> anyhow::Result<()> {
    use motley_ingest::ImageMode;
    use motley_shards::{Loader, LoaderConfig, Source};
    let tmp = tempfile::tempdir()?;
    for mode in [ImageMode::Vq, ImageMode::Latent] {
        let mut sources = Vec::new();
        for part in ["text", "captions", "speech", "interleaved"] {
            let mut recipe = Recipe::from_file(&common::repo().join(format!("data/sample/study/{part}.toml")))?;
            assert!(recipe.options.all_tokenizers, "{part}");
            recipe.options.image_mode = Some(mode);
            let out = tmp.path().join(format!("{mode:?}-{part}"));
            let mut cfg = common::config(recipe, &out);
            cfg.limit = Some(12);
            let s = ingest(&cfg)?;
            assert_eq!(s.errors, 0, "{part}: {:?}", s.errors_by_reason);
            sources.push(Source::open(&out, 1.0)?);
        }
        let vocab = sources[0].corpus.vocab().clone();
        assert!(vocab.modality(Modality::Image).is_some() && vocab.modality(Modality::Speech).is_some());
        assert_eq!(vocab.modality(Modality::Image).and_then(|m| m.latent_dim).is_some(), mode == ImageMode::Latent);
        for s in &sources {
            assert_eq!(s.corpus.vocab(), &vocab);
        }
        let cfg = LoaderConfig { seq_len: 64, batch_size: 2, ..LoaderConfig::default() };
        let batch = Loader::new(sources, cfg)?.next_batch()?;
        assert_eq!(batch.inputs.len(), 128);
    }
    Ok(())
}
