//! diffusers `VQModel` parity: motley's codes of real sample digits equal diffusers' (no
//! reference distance is within 1e-3 of a tie), and decoding diffusers' codes gives its pixels;
//! codes through ingest's segment path and the saved tokenizer file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use motley_tokenizers::ImageTokenizer;
use motley_tokenizers::pretrained::VqModelTokenizer;
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pretrained")
}

fn tensor_f32(st: &SafeTensors<'_>, name: &str) -> Result<Vec<f32>> {
    let v = st.tensor(name)?;
    Ok(match v.dtype() {
        safetensors::Dtype::F32 => {
            v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        safetensors::Dtype::U8 => v.data().iter().map(|&b| b as f32).collect(),
        safetensors::Dtype::I64 => v
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        d => anyhow::bail!("{name}: {d:?}"),
    })
}

#[test]
fn vq_model_codes_and_decodes_match_diffusers() -> Result<()> {
    let vq = VqModelTokenizer::from_folder(fixtures().join("vq"), None)?;
    assert_eq!((vq.resolution(), vq.patch(), vq.grid(), vq.vocab_size(), vq.latent_dim()), (32, 8, (4, 4), 64, None));
    let buf = std::fs::read(fixtures().join("vq_reference.safetensors"))?;
    let (_, meta) = SafeTensors::read_metadata(&buf)?;
    let names: Vec<String> = serde_json::from_str(meta.metadata().as_ref().context("metadata")?["images"].as_str())?;
    let st = SafeTensors::deserialize(&buf)?;
    let want: Vec<u32> = tensor_f32(&st, "codes")?.into_iter().map(|c| c as u32).collect();
    let top2 = tensor_f32(&st, "top2")?;
    let gap = top2.chunks_exact(2).map(|p| p[1] - p[0]).fold(f32::INFINITY, f32::min);
    assert!(gap > 1e-3, "the reference has a near-tie ({gap}): exact equality would be luck");
    let distinct: std::collections::BTreeSet<u32> = want.iter().copied().collect();
    assert!(distinct.len() > 16, "reference codes barely vary ({distinct:?})");

    let want_u8 = tensor_f32(&st, "decoded_u8")?;
    let m = 32 * 32 * 3;
    for (i, n) in names.iter().enumerate() {
        let img = motley_tokenizers::image::read_image(&fixtures().join("../../../../data/sample/images").join(n))?;
        let seg = vq.encode_image(&img, Some(n))?;
        let motley_shards::SegmentData::Tokens(codes) = &seg.data else { anyhow::bail!("not tokens") };
        assert_eq!(codes.as_slice(), &want[i * 16..(i + 1) * 16], "image {n}: codes differ from diffusers'");
        assert_eq!(seg.meta.grid, Some((4, 4)));
        let back = vq.decode_to_image(&seg)?;
        let got: Vec<f32> = back.as_raw().iter().map(|&b| b as f32).collect();
        let d = got.iter().zip(&want_u8[i * m..(i + 1) * m]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(d <= 1.0, "image {n}: decoded pixels differ by {d} levels");
    }

    // Saved as one tokenizer file, loaded back through the generic loaders.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("vq.safetensors");
    vq.save(&file)?;
    let back = motley_tokenizers::load_image(&file)?;
    assert_eq!((back.kind(), back.vocab_size()), ("vq-model", 64));
    assert_eq!(motley_tokenizers::load_any(&file)?.token_vocab_size(), 64);
    let img = motley_tokenizers::image::read_image(&fixtures().join("../../../../data/sample/images").join(&names[0]))?;
    assert_eq!(back.encode_image(&img, None)?, vq.encode_image(&img, None)?);
    // A code outside the book is an error, not a panic.
    let bad = motley_shards::Segment::tokens(motley_shards::Modality::Image, vec![64; 16])
        .with_meta(motley_shards::SegmentMeta { grid: Some((4, 4)), ..Default::default() });
    assert!(vq.decode_to_image(&bad).is_err());
    Ok(())
}
