//! `load_any` opens every kind of tokenizer file through the shared trait (and refuses one of
//! another format version), and the `Fit` trait fits and reloads each modality the same way.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::PathBuf;

use indicatif::ProgressBar;
use motley_shards::Modality;
use motley_tokenizers::{
    Fit, ImageTokenizer, LatentImageTokenizer, ModalityTokenizer, SpeechConfig, SpeechTokenizer, TextTokenizer,
    VqConfig, VqImageTokenizer, load_any,
};

#[test]
fn load_any_dispatches_on_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let text = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_gpt2style.json");

    let imgs = common::synthetic_images(6, 1);
    let c = VqConfig { codebook_size: 8, max_iter: 3, holdout: 0.0, ..VqConfig::default() };
    let (vq, _) = VqImageTokenizer::fit_images(&imgs, &c, &ProgressBar::hidden())?;
    let vq_path = dir.path().join("image-vq");
    vq.save(&vq_path)?;
    let latent_path = dir.path().join("latent.safetensors");
    ImageTokenizer::save(&LatentImageTokenizer::raw(32, 8)?, &latent_path)?;

    // Speech units from synthetic features (fit_features skips audio decoding).
    let feats: Vec<f32> = (0..400 * 80).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
    let (sp, _) = SpeechTokenizer::fit_features(
        &feats,
        &SpeechConfig { units: 16, max_iter: 3, ..SpeechConfig::default() },
        &ProgressBar::hidden(),
    )?;
    let sp_path = dir.path().join("speech.safetensors");
    sp.save(&sp_path)?;

    let t = load_any(&text)?;
    assert_eq!((t.modality(), t.token_vocab_size()), (Modality::Text, TextTokenizer::from_file(&text)?.vocab_size()));
    assert!(t.token_vocab_size() > 256);
    let v = load_any(&vq_path)?;
    assert_eq!((v.modality(), v.token_vocab_size(), v.vector_dim()), (Modality::Image, 8, None));
    let l = load_any(&latent_path)?;
    assert_eq!((l.modality(), l.token_vocab_size(), l.vector_dim()), (Modality::Image, 0, Some(192)));
    let s = load_any(&sp_path)?;
    assert_eq!((s.modality(), s.token_vocab_size()), (Modality::Speech, 16));

    // Encoding raw bytes through the trait gives what the concrete type gives.
    let png = common::png(&imgs[0]);
    assert_eq!(v.encode_raw(&png, "a.png")?, vq.encode_bytes(&png, "a.png")?);
    let seg = l.encode_raw(&png, "a.png")?;
    assert_eq!(seg.data.len(), 16);
    assert_eq!(l.render(&seg)?[0].extension, "png");

    // Wrong kinds and junk are errors naming the file.
    assert!(motley_tokenizers::load_speech(&vq_path).unwrap_err().to_string().contains("image-vq"));
    assert!(motley_tokenizers::load_image(&sp_path).unwrap_err().to_string().contains("speech.safetensors"));
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"\x01\x02\x03")?;
    assert!(load_any(&junk).unwrap_err().to_string().contains("junk.bin"));
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"")?;
    assert!(load_any(&empty).is_err());

    // A header of another format version (a newer motley's file) is refused, naming the file.
    use motley_tokenizers::store;
    for path in [&vq_path, &latent_path, &sp_path] {
        let mut loaded = store::load(path)?;
        loaded.header["version"] = 2.into();
        let views: Vec<store::Tensor<'_>> = loaded
            .tensors
            .iter()
            .map(|(name, (shape, data))| store::Tensor { name, shape: shape.clone(), data })
            .collect();
        let newer = dir.path().join("newer.safetensors");
        store::save(&newer, &loaded.header, &views)?;
        let e = load_any(&newer).unwrap_err().to_string();
        assert!(e.contains("newer.safetensors") && e.contains("header version 2"), "{e}");
    }
    Ok(())
}

#[test]
fn fit_trait_fits_and_reloads() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut paths = Vec::new();
    for (i, img) in common::synthetic_images(6, 2).iter().enumerate() {
        let p = dir.path().join(format!("{i}.png"));
        img.save(&p)?;
        paths.push(p);
    }
    fn fit_save_load<T: Fit + ModalityTokenizer + PartialEq + std::fmt::Debug>(
        files: &[PathBuf],
        cfg: &T::Config,
        out: &std::path::Path,
    ) -> anyhow::Result<()> {
        let (t, summary) = T::fit(files, cfg, &ProgressBar::hidden())?;
        serde_json::to_string(&summary)?;
        t.save_to(out)?;
        assert_eq!(T::load(out)?, t);
        Ok(())
    }
    let c = VqConfig { codebook_size: 8, max_iter: 3, ..VqConfig::default() };
    fit_save_load::<VqImageTokenizer>(&paths, &c, &dir.path().join("vq.safetensors"))?;
    let lc = motley_tokenizers::LatentConfig { dim: Some(4), ..Default::default() };
    fit_save_load::<LatentImageTokenizer>(&paths, &lc, &dir.path().join("latent.safetensors"))?;
    let _ =
        TextTokenizer::from_file(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_bytelevel.json"))?;
    Ok(())
}
