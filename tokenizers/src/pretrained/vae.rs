//! diffusers `AutoencoderKL` (the Stable Diffusion / SDXL / FLUX VAEs) as a latent image
//! tokenizer: image → posterior mean → `(mean − shift_factor) · scaling_factor` → the latent
//! grid cut into `p × p` patches (Transfusion's 2×2), each a vector of `C·p·p` values in
//! `(channel, dy, dx)` order (diffusers' FLUX `_pack_latents` order). Decoding inverts each step
//! and runs the VAE decoder.
//!
//! The blocks are candle-transformers' Stable Diffusion ones (`DownEncoderBlock2D`,
//! `UNetMidBlock2D`, `UpDecoderBlock2D`), which read diffusers' weight names. candle's own
//! `AutoEncoderKL` is not used: its posterior keeps the mean private (only a random sample is
//! public) and it ignores `shift_factor`; the encoder/decoder assembly here is those few lines.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig, UpDecoderBlock2D,
    UpDecoderBlock2DConfig,
};
use half::f16;
use image::{DynamicImage, RgbImage};
use motley_shards::{Modality, Segment};
use serde::{Deserialize, Serialize};

use super::{ModelFolder, var_builder};
use crate::error::{Result, TokenizerError};
use crate::image::{ImageTokenizer, image_meta, square};

/// `kind` of a saved AutoencoderKL tokenizer file.
pub const KIND: &str = "autoencoder-kl";

/// The fields of diffusers' `AutoencoderKL` `config.json` that shape the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default = "unit")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub act_fn: Option<String>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn unit() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// Checks what this implementation covers; anything else is an error naming `path`.
    pub(crate) fn check(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(TokenizerError::model(path, msg));
        if self.block_out_channels.is_empty() {
            return bad("block_out_channels is empty".into());
        }
        if let Some(a) = self.act_fn.as_deref().filter(|a| *a != "silu") {
            return bad(format!("act_fn {a:?} is not supported (only \"silu\")"));
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return bad(format!("down block type {t:?} is not supported (only DownEncoderBlock2D)"));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return bad(format!("up block type {t:?} is not supported (only UpDecoderBlock2D)"));
        }
        for (name, n) in
            [("down_block_types", self.down_block_types.len()), ("up_block_types", self.up_block_types.len())]
        {
            if n != 0 && n != self.block_out_channels.len() {
                return bad(format!("{name} has {n} entries, block_out_channels {}", self.block_out_channels.len()));
            }
        }
        if !self.mid_block_add_attention {
            return bad("mid_block_add_attention = false is not supported".into());
        }
        if self.block_out_channels.iter().any(|c| *c == 0 || c % self.norm_num_groups.max(1) != 0) {
            return bad(format!(
                "block_out_channels {:?} are not multiples of norm_num_groups {}",
                self.block_out_channels, self.norm_num_groups
            ));
        }
        // Each block but the last halves the grid; more than 13 would downsample 4096 px below
        // one cell (and overflow `downsample`'s shift).
        if self.block_out_channels.len() > 13 {
            return bad(format!("{} blocks in block_out_channels (at most 13)", self.block_out_channels.len()));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return bad("shift_factor must be finite".into());
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return bad(format!("scaling_factor {} must be finite and non-zero", self.scaling_factor));
        }
        Ok(())
    }

    /// Pixels per latent cell (each down block but the last halves the grid).
    pub fn downsample(&self) -> u32 {
        1 << (self.block_out_channels.len() - 1)
    }

    /// `sample_size` as one side (diffusers writes an int, or a pair); one past `u32` reads as
    /// `u32::MAX`, which the resolution check refuses.
    pub(crate) fn sample_side(&self) -> Option<u32> {
        let side = match self.sample_size.as_ref()? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::Array(a) => a.first().and_then(|v| v.as_u64()),
            _ => None,
        };
        side.map(|v| u32::try_from(v).unwrap_or(u32::MAX))
    }
}

/// Checks a square side for a model that downsamples `downsample`× and cuts latents into
/// `patch`-cell patches (1 for a VQ model's codes).
pub(crate) fn check_resolution(resolution: u32, downsample: u32, patch: u32) -> Result<()> {
    use crate::image::{MAX_PATCH, MAX_RESOLUTION};
    if resolution > MAX_RESOLUTION || patch > MAX_PATCH {
        return Err(TokenizerError::config(
            "resolution",
            format!("{resolution} px / patch {patch} too large (max {MAX_RESOLUTION} / {MAX_PATCH})"),
        ));
    }
    let cell = downsample * patch;
    if patch == 0 || resolution == 0 || !resolution.is_multiple_of(cell) {
        let per_patch = if patch == 1 { String::new() } else { format!(" x {patch} latent cells per patch") };
        return Err(TokenizerError::config(
            "resolution",
            format!("{resolution} px must be a positive multiple of {cell} ({downsample}x downsampling{per_patch})"),
        ));
    }
    Ok(())
}

/// motley's geometry around the model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VaeOptions {
    /// Square side images are resized and cropped to; `None` = the config's `sample_size`.
    pub resolution: Option<u32>,
    /// Latent cells per patch side (Transfusion: 2).
    pub patch: u32,
}

impl Default for VaeOptions {
    fn default() -> Self {
        VaeOptions { resolution: None, patch: 2 }
    }
}

/// The header of a saved AutoencoderKL tokenizer file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    kind: String,
    version: u32,
    architecture: String,
    /// The model folder it was imported from (its last path component), for people.
    model: String,
    resolution: u32,
    patch: u32,
    scaling_factor: f64,
    shift_factor: Option<f64>,
    /// The model's `config.json`, verbatim.
    config: serde_json::Value,
}

#[derive(Debug)]
pub(crate) struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownEncoderBlock2D>,
    mid: UNetMidBlock2D,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

#[derive(Debug)]
pub(crate) struct Decoder {
    conv_in: Conv2d,
    mid: UNetMidBlock2D,
    up: Vec<UpDecoderBlock2D>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

fn conv3(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    candle_nn::conv2d(cin, cout, 3, Conv2dConfig { padding: 1, ..Default::default() }, vb)
}

fn mid_block(ch: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<UNetMidBlock2D> {
    // diffusers' VAE mid block: one attention with a single head over all channels, eps 1e-6.
    let cfg = UNetMidBlock2DConfig {
        resnet_eps: 1e-6,
        output_scale_factor: 1.0,
        attn_num_head_channels: None,
        resnet_groups: Some(groups),
        ..Default::default()
    };
    UNetMidBlock2D::new(vb, ch, None, cfg)
}

impl Encoder {
    /// `out_channels`: `2·latent_channels` for a KL posterior (mean, log-variance), `latent_channels` for a VQ model.
    pub(crate) fn new(c: &VaeConfig, out_channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let boc = &c.block_out_channels;
        let conv_in = conv3(c.in_channels, boc[0], vb.pp("conv_in"))?;
        let mut down = Vec::with_capacity(boc.len());
        for (i, &out) in boc.iter().enumerate() {
            let cfg = DownEncoderBlock2DConfig {
                num_layers: c.layers_per_block,
                resnet_eps: 1e-6,
                resnet_groups: c.norm_num_groups,
                add_downsample: i + 1 < boc.len(),
                // diffusers pads (0, 1, 0, 1) and convolves unpadded; candle does the same for 0.
                downsample_padding: 0,
                ..Default::default()
            };
            let cin = if i == 0 { boc[0] } else { boc[i - 1] };
            down.push(DownEncoderBlock2D::new(vb.pp("down_blocks").pp(i.to_string()), cin, out, cfg)?);
        }
        let last = *boc.last().unwrap_or(&boc[0]);
        Ok(Encoder {
            conv_in,
            down,
            mid: mid_block(last, c.norm_num_groups, vb.pp("mid_block"))?,
            norm_out: candle_nn::group_norm(c.norm_num_groups, last, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv3(last, out_channels, vb.pp("conv_out"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for b in &self.down {
            x = b.forward(&x)?;
        }
        let x = self.mid.forward(&x, None)?;
        let x = candle_nn::ops::silu(&self.norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }
}

impl Decoder {
    pub(crate) fn new(c: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let conv_in = conv3(c.latent_channels, rev[0], vb.pp("conv_in"))?;
        let mid = mid_block(rev[0], c.norm_num_groups, vb.pp("mid_block"))?;
        let mut up = Vec::with_capacity(rev.len());
        for (i, &out) in rev.iter().enumerate() {
            let cfg = UpDecoderBlock2DConfig {
                num_layers: c.layers_per_block + 1,
                resnet_eps: 1e-6,
                resnet_groups: c.norm_num_groups,
                add_upsample: i + 1 < rev.len(),
                ..Default::default()
            };
            let cin = if i == 0 { rev[0] } else { rev[i - 1] };
            up.push(UpDecoderBlock2D::new(vb.pp("up_blocks").pp(i.to_string()), cin, out, cfg)?);
        }
        let first = c.block_out_channels[0];
        Ok(Decoder {
            conv_in,
            mid,
            up,
            norm_out: candle_nn::group_norm(c.norm_num_groups, first, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv3(first, c.out_channels, vb.pp("conv_out"))?,
        })
    }

    pub(crate) fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.mid.forward(&self.conv_in.forward(z)?, None)?;
        for b in &self.up {
            x = b.forward(&x)?;
        }
        let x = candle_nn::ops::silu(&self.norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }
}

#[derive(Debug)]
struct Net {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

/// A diffusers `AutoencoderKL` as an [`ImageTokenizer`] of continuous latent patches.
#[derive(Debug, Clone)]
pub struct AutoencoderKlTokenizer {
    cfg: VaeConfig,
    raw_config: serde_json::Value,
    model: String,
    resolution: u32,
    patch: u32,
    net: Arc<Net>,
    /// Where the network runs ([`super::encoder_device`] when it was built).
    device: Device,
    /// Where the weights' bytes are (a model folder's safetensors or a saved tokenizer file),
    /// re-read by `save` rather than kept in memory.
    weights: PathBuf,
}

impl AutoencoderKlTokenizer {
    /// Loads a diffusers model folder (`config.json` + `diffusion_pytorch_model.safetensors`).
    pub fn from_folder(dir: impl AsRef<Path>, opts: VaeOptions) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        folder.architecture()?;
        let model = folder.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Self::build(folder.config.clone(), &folder.config_path, folder.tensors()?, &folder.weights_path, model, opts)
    }

    fn build(
        raw_config: serde_json::Value,
        config_path: &Path,
        tensors: std::collections::HashMap<String, Tensor>,
        weights: &Path,
        model: String,
        opts: VaeOptions,
    ) -> Result<Self> {
        let cfg: VaeConfig = serde_json::from_value(raw_config.clone())
            .map_err(|e| TokenizerError::model(config_path, format!("AutoencoderKL config: {e}")))?;
        cfg.check(config_path)?;
        let device = super::encoder_device()?;
        let vb = var_builder(tensors, &device);
        let net = super::candle_call(weights, "load", || {
            Ok(Net {
                encoder: Encoder::new(&cfg, 2 * cfg.latent_channels, vb.pp("encoder"))?,
                decoder: Decoder::new(&cfg, vb.pp("decoder"))?,
                quant_conv: if cfg.use_quant_conv {
                    let n = 2 * cfg.latent_channels;
                    Some(candle_nn::conv2d(n, n, 1, Default::default(), vb.pp("quant_conv"))?)
                } else {
                    None
                },
                post_quant_conv: if cfg.use_post_quant_conv {
                    let n = cfg.latent_channels;
                    Some(candle_nn::conv2d(n, n, 1, Default::default(), vb.pp("post_quant_conv"))?)
                } else {
                    None
                },
            })
        })?;
        let resolution = opts
            .resolution
            .or_else(|| cfg.sample_side())
            .ok_or_else(|| TokenizerError::config("resolution", "the config has no sample_size; give a resolution"))?;
        check_resolution(resolution, cfg.downsample(), opts.patch)?;
        Ok(AutoencoderKlTokenizer {
            cfg,
            raw_config,
            model,
            resolution,
            patch: opts.patch,
            net: Arc::new(net),
            device,
            weights: weights.to_path_buf(),
        })
    }

    /// Loads a tokenizer file written by [`ImageTokenizer::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (header, tensors): (Header, _) = super::read_saved(path, KIND)?;
        let opts = VaeOptions { resolution: Some(header.resolution), patch: header.patch };
        Self::build(header.config, path, tensors, path, header.model, opts)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The model folder's name it was imported from.
    pub fn model_name(&self) -> &str {
        &self.model
    }

    /// `(scaling_factor, shift_factor)` applied to the posterior mean.
    pub fn factors(&self) -> (f64, f64) {
        (self.cfg.scaling_factor, self.cfg.shift_factor.unwrap_or(0.0))
    }

    /// Latent grid side (cells) of one image.
    pub fn latent_side(&self) -> u32 {
        self.resolution / self.cfg.downsample()
    }

    /// Scaled latents of already-squared images, `[n, C, h, w]` row-major f32: the posterior
    /// mean, minus `shift_factor`, times `scaling_factor`.
    pub fn encode_latents(&self, images: &[&RgbImage]) -> Result<Vec<f32>> {
        let side = self.resolution as usize;
        let mut px = Vec::with_capacity(images.len() * 3 * side * side);
        for img in images {
            if img.width() != self.resolution || img.height() != self.resolution {
                return Err(TokenizerError::config(
                    "image size",
                    format!("{}x{} (expected {side}x{side})", img.width(), img.height()),
                ));
            }
            px.extend(super::pixels_in(img));
        }
        // One image per forward pass: candle-transformers 0.11.1's attention block gives wrong
        // results for every image but the first of a batch (0.08 off on the parity fixture), so
        // images are parallel across records (rayon in ingest), not inside one tensor. The cause
        // is candle-core 0.11.1's CPU matmul: with a batch-invariant rhs (the Linear's weight)
        // it folds the batches of lhs into rows of one gemm, which is only right when lhs is
        // row-major, and the attention block feeds its Linears a transposed `[b, hw, c]` view.
        let plane = 3 * side * side;
        let run = || -> candle_core::Result<Vec<f32>> {
            let mut out =
                Vec::with_capacity(images.len() * self.cfg.latent_channels * (self.latent_side() as usize).pow(2));
            for chunk in px.chunks_exact(plane) {
                let x = Tensor::from_slice(chunk, (1, 3, side, side), &self.device)?;
                let mut h = self.net.encoder.forward(&x)?;
                if let Some(q) = &self.net.quant_conv {
                    h = q.forward(&h)?;
                }
                let mean = h.narrow(1, 0, self.cfg.latent_channels)?;
                let (scale, shift) = self.factors();
                let z = ((mean - shift)? * scale)?;
                out.extend(z.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(out)
        };
        super::candle_call(&self.weights, "encode", run)
    }

    /// Images (`[n, H, W]` RGB) from scaled latents `[n, C, h, w]`: undo scale and shift,
    /// decode, then diffusers' post-processing (`x/2 + 0.5`, clamp, ×255, round).
    pub fn decode_latents(&self, z: &[f32], n: usize) -> Result<Vec<RgbImage>> {
        let c = self.cfg.latent_channels;
        let s = self.latent_side() as usize;
        if z.len() != n * c * s * s {
            return Err(TokenizerError::config("latents", format!("{} values for {n} x {c}x{s}x{s}", z.len())));
        }
        // One image per pass, as in `encode_latents`.
        let run = || -> candle_core::Result<Vec<f32>> {
            let (scale, shift) = self.factors();
            let mut out = Vec::new();
            for zi in z.chunks_exact(c * s * s) {
                let zi = Tensor::from_slice(zi, (1, c, s, s), &self.device)?;
                let mut zi = ((zi / scale)? + shift)?;
                if let Some(q) = &self.net.post_quant_conv {
                    zi = q.forward(&zi)?;
                }
                let x = self.net.decoder.forward(&zi)?;
                let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
                out.extend(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(out)
        };
        let v = super::candle_call(&self.weights, "decode", run)?;
        let per = 3 * (self.resolution as usize).pow(2);
        Ok(v.chunks_exact(per).map(|img| super::pixels_out(img, self.resolution)).collect())
    }

    /// `[C, h, w]` latents of one image → `(h/p)·(w/p)` patch vectors of `C·p·p`, in
    /// `(channel, dy, dx)` order.
    pub fn patchify(&self, z: &[f32]) -> Vec<f32> {
        let (c, s, p) = (self.cfg.latent_channels, self.latent_side() as usize, self.patch as usize);
        let g = s / p;
        let mut out = Vec::with_capacity(z.len());
        for gy in 0..g {
            for gx in 0..g {
                for ch in 0..c {
                    for dy in 0..p {
                        for dx in 0..p {
                            out.push(z[(ch * s + gy * p + dy) * s + gx * p + dx]);
                        }
                    }
                }
            }
        }
        out
    }

    /// Inverse of [`Self::patchify`].
    pub fn unpatchify(&self, v: &[f32]) -> Vec<f32> {
        let (c, s, p) = (self.cfg.latent_channels, self.latent_side() as usize, self.patch as usize);
        let g = s / p;
        let mut z = vec![0.0; v.len()];
        let mut k = 0;
        for gy in 0..g {
            for gx in 0..g {
                for ch in 0..c {
                    for dy in 0..p {
                        for dx in 0..p {
                            z[(ch * s + gy * p + dy) * s + gx * p + dx] = v[k];
                            k += 1;
                        }
                    }
                }
            }
        }
        z
    }

    /// Encodes several images in one batch (each resized and cropped first) into segments.
    pub fn encode_images(&self, images: &[(&DynamicImage, Option<&str>)]) -> Result<Vec<Segment>> {
        let squared: Vec<RgbImage> =
            images.iter().map(|(img, src)| square(img, self.resolution, *src)).collect::<Result<_>>()?;
        let refs: Vec<&RgbImage> = squared.iter().collect();
        let z = self.encode_latents(&refs)?;
        let per = z.len() / images.len().max(1);
        images
            .iter()
            .enumerate()
            .map(|(i, (_, src))| {
                let v: Vec<f16> = self.patchify(&z[i * per..(i + 1) * per]).into_iter().map(f16::from_f32).collect();
                // Shards store latents as f16: a NaN or a value past ±65504 (a scaling_factor
                // off by orders of magnitude, broken weights) would reach training as inf.
                if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                    return Err(TokenizerError::model(
                        &self.weights,
                        format!(
                            "encode {}: latent value {x} is not finite in f16 (scaling_factor {}, shift_factor {})",
                            src.unwrap_or("<image>"),
                            self.cfg.scaling_factor,
                            self.cfg.shift_factor.unwrap_or(0.0)
                        ),
                    ));
                }
                Ok(Segment::latent(Modality::Image, self.dim(), v).with_meta(image_meta(self.grid(), *src)))
            })
            .collect()
    }

    /// Patch vector dimension `C·p·p`.
    pub fn dim(&self) -> u32 {
        self.cfg.latent_channels as u32 * self.patch * self.patch
    }
}

impl ImageTokenizer for AutoencoderKlTokenizer {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn resolution(&self) -> u32 {
        self.resolution
    }

    /// Pixels per patch side: the VAE's downsampling times the latent cells per patch.
    fn patch(&self) -> u32 {
        self.cfg.downsample() * self.patch
    }

    fn vocab_size(&self) -> u32 {
        0
    }

    fn latent_dim(&self) -> Option<u32> {
        Some(self.dim())
    }

    fn encode_image(&self, img: &DynamicImage, source: Option<&str>) -> Result<Segment> {
        let mut v = self.encode_images(&[(img, source)])?;
        v.pop().ok_or_else(|| TokenizerError::config("image", "encoder returned nothing"))
    }

    fn decode_to_image(&self, seg: &Segment) -> Result<RgbImage> {
        let src = seg.meta.source.as_deref();
        let data = crate::image::latent_image_data(seg, self.grid(), self.dim(), "an AutoencoderKL")?;
        let v: Vec<f32> = data.iter().map(|x| x.to_f32()).collect();
        let mut imgs = self.decode_latents(&self.unpatchify(&v), 1)?;
        imgs.pop().ok_or_else(|| TokenizerError::bad_segment(src, "decoder returned nothing"))
    }

    fn manifest_info(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "kind": KIND,
            "architecture": "AutoencoderKL",
            "model": self.model,
            "resolution": self.resolution,
            "patch_cells": self.patch,
            "latent_channels": self.cfg.latent_channels,
            "scaling_factor": self.cfg.scaling_factor,
            "shift_factor": self.cfg.shift_factor.unwrap_or(0.0),
        }))
    }

    fn save(&self, path: &Path) -> Result<()> {
        let header = Header {
            kind: KIND.into(),
            version: 1,
            architecture: "AutoencoderKL".into(),
            model: self.model.clone(),
            resolution: self.resolution,
            patch: self.patch,
            scaling_factor: self.cfg.scaling_factor,
            shift_factor: self.cfg.shift_factor,
            config: self.raw_config.clone(),
        };
        let buf = std::fs::read(&self.weights).map_err(|e| TokenizerError::io("read", &self.weights, e))?;
        crate::store::save_raw(path, &header, &buf, &self.weights)
    }
}
