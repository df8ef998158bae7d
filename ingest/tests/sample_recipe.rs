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
