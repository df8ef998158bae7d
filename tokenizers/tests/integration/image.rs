//! Image tokenizers: VQ quality grows with codebook size, fits are deterministic, files
//! round-trip, segments carry grid and source, latent patches invert.
#![allow(clippy::unwrap_used)]

use crate::common;

use indicatif::ProgressBar;
use motley_shards::{Modality, SegmentData};
use motley_tokenizers::{ImageTokenizer, LatentConfig, LatentImageTokenizer, VqConfig, VqImageTokenizer, load_image};

fn cfg(k: u32) -> VqConfig {
    VqConfig { codebook_size: k, holdout: 0.2, max_iter: 15, seed: 3, ..VqConfig::default() }
}

#[test]
fn psnr_rises_with_codebook_size() -> anyhow::Result<()> {
    let imgs = common::synthetic_images(30, 1);
    let mut last = 0.0;
    for k in [4, 16, 64] {
        let (_, s) = VqImageTokenizer::fit_images(&imgs, &cfg(k), &ProgressBar::hidden())?;
        assert_eq!(s.holdout_images, 6);
        assert!(s.psnr_holdout.is_finite());
        assert!(
            s.psnr_holdout > last + 0.3,
            "k={k}: held-out PSNR {:.2} dB did not rise above {last:.2}",
            s.psnr_holdout
        );
        assert!(s.psnr_train >= s.psnr_holdout - 3.0);
        last = s.psnr_holdout;
    }
    assert!(last > 15.0, "64 codes should reconstruct these images fairly, got {last:.2} dB");
    Ok(())
}

#[test]
fn vq_fit_is_deterministic_and_round_trips_through_a_file() -> anyhow::Result<()> {
    let imgs = common::synthetic_images(24, 2);
    let (a, sa) = VqImageTokenizer::fit_images(&imgs, &cfg(32), &ProgressBar::hidden())?;
    let (b, sb) = VqImageTokenizer::fit_images(&imgs, &cfg(32), &ProgressBar::hidden())?;
    assert_eq!(a, b);
    assert_eq!(sa.psnr_holdout, sb.psnr_holdout);
    let (c, _) = VqImageTokenizer::fit_images(&imgs, &VqConfig { seed: 4, ..cfg(32) }, &ProgressBar::hidden())?;
    assert_ne!(a, c, "another seed should give another codebook");

    let dir = tempfile::tempdir()?;
    let p = dir.path().join("vq.safetensors");
    a.save(&p)?;
    let loaded = load_image(&p)?;
    assert_eq!(loaded.kind(), "vq");
    assert_eq!(loaded.vocab_size(), 32);
    assert_eq!(loaded.grid(), (8, 8));

    let bytes = common::png(&imgs[0]);
    let seg = loaded.encode_bytes(&bytes, "images/000.png")?;
    assert_eq!(seg.modality, Modality::Image);
    assert_eq!(seg.meta.grid, Some((8, 8)));
    assert_eq!(seg.meta.source.as_deref(), Some("images/000.png"));
    let SegmentData::Tokens(ids) = &seg.data else { anyhow::bail!("VQ gives tokens") };
    assert_eq!(ids.len(), 64);
    assert!(ids.iter().all(|&i| i < 32));
    assert_eq!(seg, a.encode_image(&imgs[0], Some("images/000.png"))?);

    let png = loaded.decode_to_png(&seg)?;
    let back = image::load_from_memory(&png)?.to_rgb8();
    assert_eq!(back.dimensions(), (32, 32));
    let psnr = motley_tokenizers::image::psnr(&back, &imgs[0].to_rgb8());
    assert!(psnr > 12.0, "reconstruction PSNR {psnr:.2}");

    // Decoding rejects what this tokenizer cannot have produced.
    let mut bad = seg.clone();
    bad.data = SegmentData::Tokens(vec![40; 64]);
    assert!(loaded.decode_to_image(&bad).is_err());
    bad.data = SegmentData::Tokens(vec![0; 10]);
    assert!(loaded.decode_to_image(&bad).is_err());
    Ok(())
}

#[test]
fn larger_images_and_resolutions() -> anyhow::Result<()> {
    // Non-square input at another resolution: centre-cropped, 16x16 grid of 4px patches.
    let imgs: Vec<image::DynamicImage> = common::synthetic_images(12, 5)
        .iter()
        .map(|i| i.resize_exact(96, 64, image::imageops::FilterType::Nearest))
        .collect();
    let c = VqConfig { resolution: 64, patch: 4, codebook_size: 16, holdout: 0.0, max_iter: 5, ..VqConfig::default() };
    let (t, s) = VqImageTokenizer::fit_images(&imgs, &c, &ProgressBar::hidden())?;
    assert_eq!(s.grid, (16, 16));
    assert!(s.psnr_holdout.is_nan(), "no held-out images requested");
    assert_eq!(t.encode_image(&imgs[0], None)?.data.len(), 256);
    Ok(())
}

#[test]
fn latent_patches_invert_and_pca_trades_dims_for_fidelity() -> anyhow::Result<()> {
    let imgs = common::synthetic_images(30, 7);
    let full = LatentConfig { dim: None, holdout: 0.2, ..LatentConfig::default() };
    let (raw, s_raw) = LatentImageTokenizer::fit_images(&imgs, &full)?;
    assert_eq!(s_raw.latent_dim, 48);
    assert!(s_raw.psnr_holdout > 40.0, "f16 raw patches should be near-lossless, got {:.2}", s_raw.psnr_holdout);
    let (p8, s8) = LatentImageTokenizer::fit_images(&imgs, &LatentConfig { dim: Some(8), ..full.clone() })?;
    let (_, s24) = LatentImageTokenizer::fit_images(&imgs, &LatentConfig { dim: Some(24), ..full.clone() })?;
    assert!(s8.explained_variance < s24.explained_variance);
    assert!(s8.psnr_holdout < s24.psnr_holdout && s24.psnr_holdout < s_raw.psnr_holdout);

    let seg = p8.encode_image(&imgs[0], Some("x.png"))?;
    let SegmentData::Latent { dim, data } = &seg.data else { anyhow::bail!("latent gives vectors") };
    assert_eq!((*dim, data.len()), (8, 64 * 8));
    assert_eq!(seg.meta.grid, Some((8, 8)));

    let dir = tempfile::tempdir()?;
    let p = dir.path().join("latent.safetensors");
    p8.save(&p)?;
    let back = load_image(&p)?;
    assert_eq!(back.latent_dim(), Some(8));
    assert_eq!(back.vocab_size(), 0);
    assert_eq!(back.decode_to_image(&seg)?, p8.decode_to_image(&seg)?);
    assert_eq!(
        raw.encode_image(&imgs[1], None)?,
        LatentImageTokenizer::fit_images(&imgs, &full)?.0.encode_image(&imgs[1], None)?
    );
    Ok(())
}

#[test]
fn fit_from_files_reports_and_names_bad_files() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut paths = Vec::new();
    for (i, img) in common::synthetic_images(10, 9).iter().enumerate() {
        let p = dir.path().join(format!("{i}.png"));
        img.save(&p)?;
        paths.push(p);
    }
    let bad = dir.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really")?;
    paths.push(bad);
    let c = VqConfig { codebook_size: 8, max_iter: 5, ..VqConfig::default() };
    let e = VqImageTokenizer::fit_files(&paths, &c, &ProgressBar::hidden()).unwrap_err();
    assert!(e.to_string().contains("broken.png"), "{e}");
    let (_, s) = VqImageTokenizer::fit_files(&paths, &VqConfig { skip_bad: true, ..c }, &ProgressBar::hidden())?;
    assert_eq!(s.skipped_images, 1);
    assert_eq!(s.train_images + s.holdout_images, 10);
    Ok(())
}
