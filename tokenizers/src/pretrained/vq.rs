//! diffusers `VQModel` (the VQ-GAN family, Chameleon-style discrete image codes) as a discrete
//! image tokenizer: image → encoder → `quant_conv` → index of the nearest codebook row
//! (Euclidean, as diffusers' `VectorQuantizer` with `torch.cdist`) per latent cell, row-major
//! over the `h × w` grid, into the image vocabulary (`num_vq_embeddings` codes). Decoding looks
//! the codes up and runs `post_quant_conv` and the decoder.
//!
//! The encoder and decoder are the AutoencoderKL ones (`vae.rs`, candle-transformers' blocks):
//! diffusers builds both models from the same `Encoder` / `Decoder`, the VQ one with
//! `double_z = False`. Only `norm_type = "group"` is run (MoVQ's `"spatial"` is refused).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::Conv2d;
use image::{DynamicImage, RgbImage};
use motley_shards::{Modality, Segment, SegmentData};
use serde::{Deserialize, Serialize};

use super::vae::{Decoder, Encoder, VaeConfig};
use super::{ModelFolder, var_builder};
use crate::error::{Result, TokenizerError};
use crate::image::{ImageTokenizer, check_grid, image_meta, square};

/// `kind` of a saved VQModel tokenizer file.
pub const KIND: &str = "vq-model";

/// The VQ-specific fields of diffusers' `VQModel` `config.json`.
#[derive(Debug, Clone, Deserialize)]
struct VqFields {
    num_vq_embeddings: usize,
    #[serde(default)]
    vq_embed_dim: Option<usize>,
    #[serde(default)]
    norm_type: Option<String>,
    #[serde(default)]
    lookup_from_codebook: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    kind: String,
    version: u32,
    architecture: String,
    model: String,
    resolution: u32,
    config: serde_json::Value,
}

#[derive(Debug)]
struct Net {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    /// `[num_vq_embeddings, vq_embed_dim]`, row-major, and each row's squared norm.
    codebook: Vec<f32>,
    norms: Vec<f32>,
    codebook_t: Tensor,
}

/// A diffusers `VQModel` as an [`ImageTokenizer`] of discrete codes.
#[derive(Debug, Clone)]
pub struct VqModelTokenizer {
    cfg: VaeConfig,
    codes: usize,
    embed_dim: usize,
    raw_config: serde_json::Value,
    model: String,
    resolution: u32,
    net: Arc<Net>,
    device: Device,
    weights: PathBuf,
}

impl VqModelTokenizer {
    /// Loads a diffusers model folder; `resolution` defaults to the config's `sample_size`.
    pub fn from_folder(dir: impl AsRef<Path>, resolution: Option<u32>) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        folder.architecture()?;
        let model = folder.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Self::build(
            folder.config.clone(),
            &folder.config_path,
            folder.tensors()?,
            &folder.weights_path,
            model,
            resolution,
        )
    }

    /// Loads a tokenizer file written by [`ImageTokenizer::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (header, tensors): (Header, _) = super::read_saved(path, KIND)?;
        Self::build(header.config, path, tensors, path, header.model, Some(header.resolution))
    }

    fn build(
        raw_config: serde_json::Value,
        config_path: &Path,
        tensors: std::collections::HashMap<String, Tensor>,
        weights: &Path,
        model: String,
        resolution: Option<u32>,
    ) -> Result<Self> {
        let cfg: VaeConfig = serde_json::from_value(raw_config.clone())
            .map_err(|e| TokenizerError::model(config_path, format!("VQModel config: {e}")))?;
        let vq: VqFields = serde_json::from_value(raw_config.clone())
            .map_err(|e| TokenizerError::model(config_path, format!("VQModel config: {e}")))?;
        cfg.check(config_path)?;
        if let Some(t) = vq.norm_type.as_deref().filter(|t| *t != "group") {
            return Err(TokenizerError::model(
                config_path,
                format!("norm_type {t:?} is not supported (only \"group\")"),
            ));
        }
        if vq.lookup_from_codebook {
            return Err(TokenizerError::model(config_path, "lookup_from_codebook = true is not supported"));
        }
        if vq.num_vq_embeddings == 0 || vq.num_vq_embeddings > u32::MAX as usize {
            return Err(TokenizerError::model(config_path, format!("num_vq_embeddings {}", vq.num_vq_embeddings)));
        }
        let embed_dim = vq.vq_embed_dim.unwrap_or(cfg.latent_channels);
        if embed_dim == 0 {
            return Err(TokenizerError::model(config_path, "vq_embed_dim (or latent_channels) is 0"));
        }
        let (n, l) = (vq.num_vq_embeddings, cfg.latent_channels);
        let device = super::encoder_device()?;
        let vb = var_builder(tensors, &device);
        let net = super::candle_call(weights, "load", || {
            let codebook_t = vb.get((n, embed_dim), "quantize.embedding.weight")?;
            let codebook: Vec<f32> = codebook_t.flatten_all()?.to_vec1()?;
            let norms = codebook.chunks_exact(embed_dim).map(|r| r.iter().map(|v| v * v).sum()).collect();
            Ok(Net {
                encoder: Encoder::new(&cfg, l, vb.pp("encoder"))?,
                decoder: Decoder::new(&cfg, vb.pp("decoder"))?,
                quant_conv: candle_nn::conv2d(l, embed_dim, 1, Default::default(), vb.pp("quant_conv"))?,
                post_quant_conv: candle_nn::conv2d(embed_dim, l, 1, Default::default(), vb.pp("post_quant_conv"))?,
                codebook,
                norms,
                codebook_t,
            })
        })?;
        let resolution = resolution
            .or_else(|| cfg.sample_side())
            .ok_or_else(|| TokenizerError::config("resolution", "the config has no sample_size; give a resolution"))?;
        super::vae::check_resolution(resolution, cfg.downsample(), 1)?;
        Ok(VqModelTokenizer {
            cfg,
            codes: n,
            embed_dim,
            raw_config,
            model,
            resolution,
            net: Arc::new(net),
            device,
            weights: weights.to_path_buf(),
        })
    }

    /// The model folder's name it was imported from.
    pub fn model_name(&self) -> &str {
        &self.model
    }

    fn side(&self) -> usize {
        (self.resolution / self.cfg.downsample()) as usize
    }

    /// Codes of an already-squared image, row-major over the latent grid.
    pub fn encode_codes(&self, img: &RgbImage) -> Result<Vec<u32>> {
        let side = self.resolution as usize;
        if img.width() != self.resolution || img.height() != self.resolution {
            return Err(TokenizerError::config(
                "image size",
                format!("{}x{} (expected {side}x{side})", img.width(), img.height()),
            ));
        }
        let px = super::pixels_in(img);
        let run = || -> candle_core::Result<Vec<f32>> {
            let x = Tensor::from_vec(px, (1, 3, side, side), &self.device)?;
            let h = self.net.quant_conv.forward(&self.net.encoder.forward(&x)?)?;
            // [1, D, h, w] → [h·w, D]
            h.squeeze(0)?.flatten_from(1)?.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()
        };
        let z = super::candle_call(&self.weights, "encode", run)?;
        Ok(z.chunks_exact(self.embed_dim).map(|v| self.nearest(v)).collect())
    }

    /// Index of the codebook row nearest to `v` (first on ties, as torch's argmin); distances in
    /// f64 so near-ties are not decided by f32 rounding.
    fn nearest(&self, v: &[f32]) -> u32 {
        let vn: f64 = v.iter().map(|&x| x as f64 * x as f64).sum();
        let mut best = (f64::INFINITY, 0u32);
        for (k, row) in self.net.codebook.chunks_exact(self.embed_dim).enumerate() {
            let dot: f64 = row.iter().zip(v).map(|(&a, &b)| a as f64 * b as f64).sum();
            let d = vn - 2.0 * dot + self.net.norms[k] as f64;
            if d < best.0 {
                best = (d, k as u32);
            }
        }
        best.1
    }

    /// Pictures from codes (row-major `h × w`).
    pub fn decode_codes(&self, codes: &[u32]) -> Result<RgbImage> {
        let s = self.side();
        if codes.len() != s * s {
            return Err(TokenizerError::config("codes", format!("{} codes for a {s}x{s} grid", codes.len())));
        }
        if let Some(c) = codes.iter().find(|&&c| c as usize >= self.codes) {
            return Err(TokenizerError::config("codes", format!("code {c} outside the {}-code book", self.codes)));
        }
        let run = || -> candle_core::Result<Vec<f32>> {
            let idx = Tensor::from_slice(codes, codes.len(), &self.device)?;
            let q = self.net.codebook_t.index_select(&idx, 0)?; // [h·w, D]
            let q = q.t()?.reshape((1, self.embed_dim, s, s))?;
            let x = self.net.decoder.forward(&self.net.post_quant_conv.forward(&q)?)?;
            let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
            x.flatten_all()?.to_vec1::<f32>()
        };
        let v = super::candle_call(&self.weights, "decode", run)?;
        Ok(super::pixels_out(&v, self.resolution))
    }
}

impl ImageTokenizer for VqModelTokenizer {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn resolution(&self) -> u32 {
        self.resolution
    }

    /// Pixels per code: the model's downsampling.
    fn patch(&self) -> u32 {
        self.cfg.downsample()
    }

    fn vocab_size(&self) -> u32 {
        self.codes as u32
    }

    fn latent_dim(&self) -> Option<u32> {
        None
    }

    fn encode_image(&self, img: &DynamicImage, source: Option<&str>) -> Result<Segment> {
        let sq = square(img, self.resolution, source)?;
        Ok(Segment::tokens(Modality::Image, self.encode_codes(&sq)?).with_meta(image_meta(self.grid(), source)))
    }

    fn decode_to_image(&self, seg: &Segment) -> Result<RgbImage> {
        let src = seg.meta.source.as_deref();
        let SegmentData::Tokens(ids) = &seg.data else {
            return Err(TokenizerError::bad_segment(src, "a VQModel needs discrete codes, got latent vectors"));
        };
        if seg.modality != Modality::Image {
            return Err(TokenizerError::bad_segment(src, format!("not an image segment ({})", seg.modality)));
        }
        check_grid(seg, self.grid())?;
        self.decode_codes(ids).map_err(|e| TokenizerError::bad_segment(src, e))
    }

    fn manifest_info(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "kind": KIND,
            "architecture": "VQModel",
            "model": self.model,
            "resolution": self.resolution,
            "codes": self.codes,
        }))
    }

    fn save(&self, path: &Path) -> Result<()> {
        let header = Header {
            kind: KIND.into(),
            version: 1,
            architecture: "VQModel".into(),
            model: self.model.clone(),
            resolution: self.resolution,
            config: self.raw_config.clone(),
        };
        let buf = std::fs::read(&self.weights).map_err(|e| TokenizerError::io("read", &self.weights, e))?;
        crate::store::save_raw(path, &header, &buf, &self.weights)
    }
}
