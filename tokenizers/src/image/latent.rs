//! Continuous images (Transfusion setting): the image as a grid of p×p patch vectors in a
//! normalized colour space, optionally projected to fewer dimensions by a fitted PCA, stored
//! as f16, with the inverse map for visualization.

use std::path::{Path, PathBuf};
use std::time::Instant;

use half::f16;
use image::{DynamicImage, RgbImage};
use indicatif::ProgressBar;
use motley_shards::{Modality, Segment};
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ColorNorm, ImageTokenizer, PreparedImages, check_geometry, image_meta, patchify, square, unpatchify};
use crate::error::{Result, TokenizerError};
use crate::pca::Pca;
use crate::store;

/// How to fit a latent-patch tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentConfig {
    pub resolution: u32,
    pub patch: u32,
    /// Project patches to this many dimensions with PCA; None keeps all p²·3 values.
    pub dim: Option<u32>,
    pub holdout: f32,
    /// PCA is fitted on at most this many patches (a seeded random subset).
    pub max_patches: usize,
    pub seed: u64,
    pub skip_bad: bool,
}

impl Default for LatentConfig {
    fn default() -> Self {
        LatentConfig {
            resolution: 32,
            patch: 4,
            dim: Some(16),
            holdout: 0.1,
            max_patches: 200_000,
            seed: 0,
            skip_bad: false,
        }
    }
}

/// What a fit did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentFitSummary {
    pub resolution: u32,
    pub patch: u32,
    pub grid: (u16, u16),
    pub input_dim: u32,
    pub latent_dim: u32,
    /// Fraction of patch variance the kept PCA components explain (1 without PCA).
    pub explained_variance: f64,
    pub train_images: usize,
    pub holdout_images: usize,
    pub skipped_images: usize,
    /// PSNR (dB) of encode → f16 → decode on held-out images.
    pub psnr_holdout: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LatentHeader {
    kind: String,
    version: u32,
    resolution: u32,
    patch: u32,
    input_dim: u32,
    latent_dim: u32,
    pca: bool,
    explained_variance: f64,
    norm: ColorNorm,
}

/// Latent-patch image tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentImageTokenizer {
    resolution: u32,
    patch: u32,
    norm: ColorNorm,
    pca: Option<Pca>,
}

impl LatentImageTokenizer {
    /// An unfitted tokenizer: raw normalized patches with a fixed colour normalization.
    pub fn raw(resolution: u32, patch: u32) -> Result<Self> {
        check_geometry(resolution, patch)?;
        Ok(LatentImageTokenizer { resolution, patch, norm: ColorNorm::default(), pca: None })
    }

    pub fn fit_files(
        paths: &[PathBuf],
        cfg: &LatentConfig,
        progress: &ProgressBar,
    ) -> Result<(Self, LatentFitSummary)> {
        check_geometry(cfg.resolution, cfg.patch)?;
        let start = Instant::now();
        let prepared = super::prepare_files(paths, cfg.resolution, cfg.skip_bad, progress)?;
        Self::fit_prepared(prepared, cfg, start)
    }

    pub fn fit_images(images: &[DynamicImage], cfg: &LatentConfig) -> Result<(Self, LatentFitSummary)> {
        check_geometry(cfg.resolution, cfg.patch)?;
        let start = Instant::now();
        Self::fit_prepared(super::prepare_images(images, cfg.resolution)?, cfg, start)
    }

    fn fit_prepared(prepared: PreparedImages, cfg: &LatentConfig, start: Instant) -> Result<(Self, LatentFitSummary)> {
        let input_dim = (cfg.patch * cfg.patch * 3) as usize;
        if let Some(d) = cfg.dim
            && (d == 0 || d as usize > input_dim)
        {
            return Err(TokenizerError::config(
                "latent dimension",
                format!("{d} (must be 1..={input_dim} for {}x{} patches)", cfg.patch, cfg.patch),
            ));
        }
        if input_dim > 768 && cfg.dim.is_some() {
            return Err(TokenizerError::config(
                "latent dimension",
                format!("PCA on {input_dim}-dimensional patches is not supported (max 768)"),
            ));
        }
        let n = prepared.images.len();
        if n == 0 {
            return Err(TokenizerError::NoData { what: "latent patches", msg: "no training images".into() });
        }
        let (train_idx, held_idx) = super::split_holdout(n, cfg.holdout, cfg.seed);
        let train: Vec<RgbImage> = train_idx.iter().map(|&i| prepared.images[i].clone()).collect();
        let norm = ColorNorm::fit(&train);
        let pca = match cfg.dim {
            Some(d) => {
                let per: Vec<Vec<f32>> = train.par_iter().map(|img| patchify(img, cfg.patch, &norm)).collect();
                let mut data = per.concat();
                let total = data.len() / input_dim;
                if total > cfg.max_patches {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x1a7e);
                    let mut idx = rand::seq::index::sample(&mut rng, total, cfg.max_patches).into_vec();
                    idx.sort_unstable();
                    let mut sub = Vec::with_capacity(cfg.max_patches * input_dim);
                    for i in idx {
                        sub.extend_from_slice(&data[i * input_dim..(i + 1) * input_dim]);
                    }
                    data = sub;
                }
                Some(Pca::fit(&data, input_dim, d as usize))
            }
            None => None,
        };
        let tok = LatentImageTokenizer { resolution: cfg.resolution, patch: cfg.patch, norm, pca };
        let held: Vec<RgbImage> = held_idx.iter().map(|&i| prepared.images[i].clone()).collect();
        let psnr_holdout = if held.is_empty() {
            f64::NAN
        } else {
            let mses: Vec<f64> = held
                .par_iter()
                .map(|img| {
                    let z = tok.encode_squared(img);
                    super::mse_u8(img.as_raw(), tok.latents_to_image(&z).as_raw())
                })
                .collect();
            super::psnr_from_mse(mses.iter().sum::<f64>() / mses.len() as f64)
        };
        let summary = LatentFitSummary {
            resolution: cfg.resolution,
            patch: cfg.patch,
            grid: tok.grid(),
            input_dim: input_dim as u32,
            latent_dim: tok.dim(),
            explained_variance: tok.pca.as_ref().map_or(1.0, |p| p.explained),
            train_images: train.len(),
            holdout_images: held.len(),
            skipped_images: prepared.skipped.len(),
            psnr_holdout,
            seconds: start.elapsed().as_secs_f64(),
        };
        Ok((tok, summary))
    }

    /// Latent vector dimension.
    pub fn dim(&self) -> u32 {
        self.pca.as_ref().map_or(self.patch * self.patch * 3, |p| p.output_dim as u32)
    }

    /// f16 latents of an already-squared image, `grid² × dim`, row-major.
    pub fn encode_squared(&self, img: &RgbImage) -> Vec<f16> {
        let patches = patchify(img, self.patch, &self.norm);
        match &self.pca {
            None => patches.iter().map(|&v| f16::from_f32(v)).collect(),
            Some(p) => {
                let mut z = Vec::with_capacity(patches.len() / p.input_dim * p.output_dim);
                for x in patches.chunks_exact(p.input_dim) {
                    p.project(x, &mut z);
                }
                z.into_iter().map(f16::from_f32).collect()
            }
        }
    }

    fn latents_to_image(&self, z: &[f16]) -> RgbImage {
        let zf: Vec<f32> = z.iter().map(|v| v.to_f32()).collect();
        let patches = match &self.pca {
            None => zf,
            Some(p) => {
                let mut x = Vec::with_capacity(zf.len() / p.output_dim * p.input_dim);
                for zi in zf.chunks_exact(p.output_dim) {
                    p.inverse(zi, &mut x);
                }
                x
            }
        };
        unpatchify(&patches, self.grid(), self.patch, &self.norm)
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_loaded(path, store::load(path)?)
    }

    pub(crate) fn from_loaded(path: &Path, mut loaded: store::Loaded) -> Result<Self> {
        if loaded.kind() != Some("latent") {
            return Err(TokenizerError::bad_file(
                path,
                format!("expected a latent image tokenizer, found kind {:?}", loaded.kind()),
            ));
        }
        let h: LatentHeader = loaded.header_as(path)?;
        check_geometry(h.resolution, h.patch).map_err(|e| TokenizerError::bad_file(path, e))?;
        h.norm.validate(path)?;
        let input_dim = (h.patch * h.patch * 3) as usize;
        if h.input_dim as usize != input_dim || h.latent_dim == 0 || h.latent_dim as usize > input_dim {
            return Err(TokenizerError::bad_file(
                path,
                format!("inconsistent header: input_dim {}, latent_dim {}", h.input_dim, h.latent_dim),
            ));
        }
        let pca = if h.pca {
            let k = h.latent_dim as usize;
            let mean = loaded.take(path, "pca_mean", &[input_dim])?;
            let components = loaded.take(path, "pca_components", &[k, input_dim])?;
            Some(Pca { input_dim, output_dim: k, mean, components, explained: h.explained_variance })
        } else {
            None
        };
        Ok(LatentImageTokenizer { resolution: h.resolution, patch: h.patch, norm: h.norm, pca })
    }
}

impl ImageTokenizer for LatentImageTokenizer {
    fn kind(&self) -> &'static str {
        "latent"
    }

    fn resolution(&self) -> u32 {
        self.resolution
    }

    fn patch(&self) -> u32 {
        self.patch
    }

    fn vocab_size(&self) -> u32 {
        0
    }

    fn latent_dim(&self) -> Option<u32> {
        Some(self.dim())
    }

    fn encode_image(&self, img: &DynamicImage, source: Option<&str>) -> Result<Segment> {
        let sq = square(img, self.resolution, source)?;
        Ok(Segment::latent(Modality::Image, self.dim(), self.encode_squared(&sq))
            .with_meta(image_meta(self.grid(), source)))
    }

    fn decode_to_image(&self, seg: &Segment) -> Result<RgbImage> {
        let data = super::latent_image_data(seg, self.grid(), self.dim(), "latent tokenizer")?;
        Ok(self.latents_to_image(data))
    }

    fn save(&self, path: &Path) -> Result<()> {
        let input_dim = (self.patch * self.patch * 3) as usize;
        let h = LatentHeader {
            kind: "latent".into(),
            version: 1,
            resolution: self.resolution,
            patch: self.patch,
            input_dim: input_dim as u32,
            latent_dim: self.dim(),
            pca: self.pca.is_some(),
            explained_variance: self.pca.as_ref().map_or(1.0, |p| p.explained),
            norm: self.norm,
        };
        let tensors = match &self.pca {
            Some(p) => vec![
                store::Tensor { name: "pca_mean", shape: vec![input_dim], data: &p.mean },
                store::Tensor { name: "pca_components", shape: vec![p.output_dim, input_dim], data: &p.components },
            ],
            None => Vec::new(),
        };
        store::save(path, &h, &tensors)
    }
}
