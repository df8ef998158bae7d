//! tokenizer.json files written by HF's Python library (fixtures made by
//! fixtures/make_text_fixture.py) load here and encode to exactly the ids Python produced; an
//! inconsistent one is an error, not a panic inside HF `tokenizers`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use motley_tokenizers::{ModalityTokenizer, TextTokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn python_made_tokenizers_encode_like_python() -> anyhow::Result<()> {
    let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("hf_expected.json"))?)?;
    let inputs: Vec<String> = serde_json::from_value(expected["inputs"].clone())?;
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    for name in ["hf_bytelevel", "hf_gpt2style"] {
        let tok = TextTokenizer::from_file(fixtures().join(format!("{name}.json")))?;
        let want: Vec<Vec<u32>> = serde_json::from_value(expected["ids"][name].clone())?;
        let got = tok.encode_batch(&refs)?;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{name}: input {i} {:?}", inputs[i]);
        }
        assert_eq!(got.len(), want.len());
        // One-at-a-time encoding agrees with the batch.
        for (s, w) in refs.iter().zip(&want) {
            assert_eq!(&tok.encode(s)?, w);
        }
        let decoded: Vec<String> = serde_json::from_value(expected["decoded"][name].clone())?;
        for (ids, d) in want.iter().zip(&decoded) {
            assert_eq!(&tok.decode(ids)?, d, "{name}: decode");
        }
    }
    Ok(())
}

#[test]
fn specials_are_reserved_ids_and_survive_save_load() -> anyhow::Result<()> {
    let tok = TextTokenizer::from_file(fixtures().join("hf_gpt2style.json"))?;
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|image|>"), Some(2));
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("tokenizer.json");
    tok.save(&p)?;
    let back = TextTokenizer::from_file(&p)?;
    assert_eq!(back.vocab_size(), tok.vocab_size());
    let s = "a <|image|> in text";
    assert_eq!(back.encode(s)?, tok.encode(s)?);
    assert!(back.encode(s)?.contains(&2));
    // The generic trait view: text segment with its source, rendered back as text.
    let seg = back.encode_raw(s.as_bytes(), "inline")?;
    assert_eq!(seg.meta.source.as_deref(), Some("inline"));
    let r = back.render(&seg)?;
    assert_eq!(r[0].extension, "txt");
    assert_eq!(String::from_utf8(r[0].bytes.clone())?, s);
    Ok(())
}

#[test]
fn trained_tokenizer_loads_in_python_shape() -> anyhow::Result<()> {
    // Our own training writes a tokenizer.json that reloads and round-trips arbitrary bytes.
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("corpus.txt");
    std::fs::write(&f, "motley turns raw text, images and speech into token shards.\n".repeat(40))?;
    let cfg = motley_tokenizers::TextTrainConfig { vocab_size: 320, ..Default::default() };
    let (tok, summary) = TextTokenizer::train(&[f], &cfg)?;
    assert!(summary.vocab_size > 257);
    let p = dir.path().join("tokenizer.json");
    tok.save(&p)?;
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&p)?)?;
    assert_eq!(json["model"]["type"], "BPE");
    assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
    let back = TextTokenizer::from_file(&p)?;
    for s in ["token shards", "never seen: ∮ E⋅da = Q", "\u{0}\u{7f}"] {
        assert_eq!(back.decode(&back.encode(s)?)?, s);
    }
    Ok(())
}

#[test]
fn merges_that_lack_the_subword_prefix_are_refused() -> anyhow::Result<()> {
    // HF's BPE builder strips `continuing_subword_prefix` from each merge's second token
    // unchecked: a shorter token underflowed (a panic), a longer one was cut inside a
    // character and read as UTF-8 unchecked. Such a file is an error naming it.
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("hf_gpt2style.json"))?)?;
    json["model"]["continuing_subword_prefix"] = "Ġ".into();
    let e = TextTokenizer::from_bytes(&serde_json::to_vec(&json)?, "edited.json").unwrap_err().to_string();
    assert!(e.contains("edited.json") && e.contains("continuing_subword_prefix"), "{e}");
    Ok(())
}
