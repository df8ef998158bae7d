//! diffusers `AutoencoderKL` parity: motley's latents and decodes against what diffusers
//! computed for a tiny randomly initialized model on real sample-corpus digits
//! (`fixtures/pretrained/make_fixtures.py`), and clear errors for broken model folders.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use motley_tokenizers::pretrained::{AutoencoderKlTokenizer, VaeOptions};
use motley_tokenizers::{ImageTokenizer, TokenizerError};
use safetensors::SafeTensors;

use crate::common;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pretrained")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Reference tensors by name: shape and values (f32, or u8 widened).
type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// The reference tensors by name, and the image names they were computed on.
fn reference(name: &str) -> Result<(Tensors, Vec<String>)> {
    let buf = std::fs::read(fixtures().join(name))?;
    let (_, meta) = SafeTensors::read_metadata(&buf)?;
    let images: Vec<String> = serde_json::from_str(meta.metadata().as_ref().context("metadata")?["images"].as_str())?;
    let st = SafeTensors::deserialize(&buf)?;
    let mut out = HashMap::new();
    for (n, v) in st.tensors() {
        let data: Vec<f32> = match v.dtype() {
            safetensors::Dtype::F32 => {
                v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            safetensors::Dtype::U8 => v.data().iter().map(|&b| b as f32).collect(),
            d => anyhow::bail!("{n}: {d:?}"),
        };
        out.insert(n, (v.shape().to_vec(), data));
    }
    Ok((out, images))
}

fn sample_images(names: &[String]) -> Result<Vec<image::RgbImage>> {
    names
        .iter()
        .map(|n| {
            let img = motley_tokenizers::image::read_image(&repo().join("data/sample/images").join(n))?;
            Ok(motley_tokenizers::image::square(&img, 32, Some(n))?)
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn autoencoder_kl_latents_and_decodes_match_diffusers() -> Result<()> {
    let vae = AutoencoderKlTokenizer::from_folder(fixtures().join("vae"), VaeOptions::default())?;
    assert_eq!((vae.resolution(), vae.patch(), vae.grid(), vae.latent_dim()), (32, 16, (2, 2), Some(16)));
    assert_eq!(vae.factors(), (0.3611, 0.1159));
    let (refs, names) = reference("vae_reference.safetensors")?;
    let images = sample_images(&names)?;
    let n = images.len();

    // Encode: all images in one batch, and one at a time (batching must not change a value).
    let (shape, want) = &refs["latents"];
    assert_eq!(shape, &vec![n, 4, 4, 4]);
    let got = vae.encode_latents(&images.iter().collect::<Vec<_>>())?;
    let d = max_abs_diff(&got, want);
    assert!(d < 1e-4, "latents differ from diffusers' by {d}");
    let spread = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(spread > 1e-2, "reference latents are all ~0 ({spread}): the comparison would prove nothing");
    for (i, img) in images.iter().enumerate() {
        let one = vae.encode_latents(&[img])?;
        assert!(max_abs_diff(&one, &got[i * 64..(i + 1) * 64]) < 1e-5, "image {i}: batch changes its latents");
    }

    // Decode diffusers' own latents: the float image within 1e-4, pixels within 1 level.
    let (_, x) = &refs["decoded"];
    let (_, want_u8) = &refs["decoded_u8"];
    let imgs = vae.decode_latents(want, n)?;
    let got_u8: Vec<f32> = imgs.iter().flat_map(|i| i.as_raw().iter().map(|&b| b as f32)).collect();
    let d = max_abs_diff(&got_u8, want_u8);
    assert!(d <= 1.0, "decoded pixels differ by {d} levels");
    let exact = got_u8.iter().zip(want_u8.iter()).filter(|(a, b)| a == b).count();
    assert!(exact * 100 >= got_u8.len() * 99, "only {exact} of {} decoded pixels are exact", got_u8.len());
    assert!(x.iter().any(|v| v.abs() > 1e-2));

    // Through segments: patchify ∘ unpatchify is the identity, and a segment's f16 latents decode
    // to within a few levels of the f32 decode.
    let seg = vae.encode_image(&image::DynamicImage::ImageRgb8(images[0].clone()), Some(&names[0]))?;
    assert_eq!(seg.meta.grid, Some((2, 2)));
    assert_eq!(vae.unpatchify(&vae.patchify(&got[..64])), got[..64].to_vec());
    let png = vae.decode_to_png(&seg)?;
    let back = image::load_from_memory(&png)?.to_rgb8();
    let d = max_abs_diff(&back.as_raw().iter().map(|&b| b as f32).collect::<Vec<_>>(), &want_u8[..32 * 32 * 3]);
    assert!(d <= 4.0, "f16 segment decode differs by {d} levels");
    Ok(())
}

#[test]
fn autoencoder_kl_patch_order_is_channel_dy_dx() -> Result<()> {
    let vae = AutoencoderKlTokenizer::from_folder(fixtures().join("vae"), VaeOptions::default())?;
    // [C=4, 4, 4] with value = c*100 + y*10 + x: patch (0, 1) starts at channel 0, row 0, col 2.
    let z: Vec<f32> =
        (0..4).flat_map(|c| (0..4).flat_map(move |y| (0..4).map(move |x| (c * 100 + y * 10 + x) as f32))).collect();
    let v = vae.patchify(&z);
    assert_eq!(&v[16..24], &[2.0, 3.0, 12.0, 13.0, 102.0, 103.0, 112.0, 113.0]);
    Ok(())
}

#[test]
fn autoencoder_kl_saved_file_reloads_identically() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vae =
        AutoencoderKlTokenizer::from_folder(fixtures().join("vae"), VaeOptions { resolution: Some(64), patch: 2 })?;
    let file = dir.path().join("image/vae.safetensors");
    vae.save(&file)?;
    let back = motley_tokenizers::load_image(&file)?;
    assert_eq!((back.kind(), back.resolution(), back.grid()), ("autoencoder-kl", 64, (4, 4)));
    let any = motley_tokenizers::load_any(&file)?;
    assert_eq!(any.vector_dim(), Some(16));
    let img = image::DynamicImage::ImageRgb8(sample_images(&["00003.png".into()])?.remove(0));
    assert_eq!(vae.encode_image(&img, None)?, back.encode_image(&img, None)?);
    Ok(())
}

fn broken_model(edit: impl FnOnce(&mut Vec<common::RawTensor>, &mut serde_json::Value)) -> Result<tempfile::TempDir> {
    common::broken_model("vae", "diffusion_pytorch_model.safetensors", edit)
}

fn load_err(dir: &Path) -> String {
    match AutoencoderKlTokenizer::from_folder(dir, VaeOptions::default()) {
        Ok(_) => panic!("a broken model folder loaded"),
        Err(e @ TokenizerError::Model { .. }) => e.to_string(),
        Err(e) => panic!("wrong error kind: {e}"),
    }
}

#[test]
fn broken_model_folders_are_clear_errors() -> Result<()> {
    // A missing tensor: the error names the weights file and the tensor.
    let dir = broken_model(|t, _| t.retain(|(n, _, _)| n != "decoder.mid_block.attentions.0.to_q.weight"))?;
    let e = load_err(dir.path());
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    assert!(e.contains("decoder.mid_block.attentions.0.to_q"), "{e}");

    // A tensor of the wrong shape.
    let dir = broken_model(|t, _| {
        let x = t.iter_mut().find(|(n, _, _)| n == "encoder.conv_in.weight").expect("fixture tensor");
        assert_eq!(x.1, vec![8, 3, 3, 3]);
        x.1 = vec![4, 3, 3, 3];
        x.2.truncate(4 * 3 * 3 * 3 * 4);
    })?;
    let e = load_err(dir.path());
    assert!(e.contains("diffusion_pytorch_model.safetensors") && e.contains("encoder.conv_in.weight"), "{e}");
    assert!(e.contains("shape"), "{e}");

    // An unknown architecture in config.json.
    let dir = broken_model(|_, c| c["_class_name"] = "AutoencoderTiny".into())?;
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("AutoencoderTiny"), "{e}");

    // Geometry past what fits in memory or in `u32` is refused before anything is allocated
    // (a 4e9 px side once aborted in the resize), as are latents f16 cannot store.
    let dir = broken_model(|_, c| c["sample_size"] = serde_json::json!(4_000_000_000u64))?;
    let e = AutoencoderKlTokenizer::from_folder(dir.path(), VaeOptions::default()).expect_err("4e9 px").to_string();
    assert!(e.contains("too large"), "{e}");
    let dir = broken_model(|_, c| c["block_out_channels"] = serde_json::json!(vec![8; 40]))?;
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("block_out_channels"), "{e}");
    let dir = broken_model(|_, c| c["scaling_factor"] = serde_json::json!(1e30))?;
    let vae = AutoencoderKlTokenizer::from_folder(dir.path(), VaeOptions::default())?;
    let img = &common::synthetic_images(1, 3)[0];
    let e = vae.encode_image(img, Some("big.png")).expect_err("inf latents").to_string();
    assert!(e.contains("big.png") && e.contains("not finite") && e.contains("scaling_factor"), "{e}");

    // No weights at all.
    let dir = tempfile::tempdir()?;
    std::fs::copy(fixtures().join("vae/config.json"), dir.path().join("config.json"))?;
    let e = load_err(dir.path());
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    Ok(())
}

#[test]
fn autoencoder_kl_loads_f16_weights() -> Result<()> {
    // Released VAEs often ship fp16 safetensors; they are widened to f32 on load.
    let src = fixtures().join("vae");
    let buf = std::fs::read(src.join("diffusion_pytorch_model.safetensors"))?;
    let st = SafeTensors::deserialize(&buf)?;
    let halves: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let h: Vec<u8> = v
                .data()
                .chunks_exact(4)
                .flat_map(|b| half::f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes())
                .collect();
            (n, v.shape().to_vec(), h)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = halves
        .iter()
        .map(|(n, s, d)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), d)?)))
        .collect::<Result<_>>()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("diffusion_pytorch_model.safetensors"), safetensors::serialize(views, None)?)?;
    std::fs::copy(src.join("config.json"), dir.path().join("config.json"))?;
    let vae = AutoencoderKlTokenizer::from_folder(dir.path(), VaeOptions::default())?;
    let (refs, names) = reference("vae_reference.safetensors")?;
    let images = sample_images(&names)?;
    let got = vae.encode_latents(&images.iter().collect::<Vec<_>>())?;
    let d = max_abs_diff(&got, &refs["latents"].1);
    // f16 weights move the latents a little, not a lot.
    assert!(d > 0.0 && d < 2e-2, "f16-weight latents differ from the f32 reference by {d}");
    Ok(())
}
