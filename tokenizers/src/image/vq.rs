//! Discrete images (Chameleon setting): a learned VQ codebook over p×p patches in a
//! normalized colour space, fitted by k-means++ (mini-batch for scale).

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::{DynamicImage, RgbImage};
use indicatif::ProgressBar;
use motley_shards::{Modality, Segment, SegmentData};
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{
    ColorNorm, ImageTokenizer, PreparedImages, check_geometry, check_grid, image_meta, patchify, square, unpatchify,
};
use crate::error::{Result, TokenizerError};
use crate::kmeans::{self, Codebook, KMeansConfig};
use crate::store;

/// Smallest and largest codebook sizes accepted.
pub const MIN_CODEBOOK: u32 = 2;
pub const MAX_CODEBOOK: u32 = 65_536;

/// How to fit a VQ image tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqConfig {
    /// Images are centre-cropped and resized to `resolution`².
    pub resolution: u32,
    /// Patch side in pixels; the code grid is `(resolution / patch)`².
    pub patch: u32,
    /// Number of codewords (256 to 8,192 is the intended range).
    pub codebook_size: u32,
    /// Fraction of images held out for the reconstruction PSNR.
    pub holdout: f32,
    /// At most this many training patches are clustered (a seeded random subset).
    pub max_patches: usize,
    /// Lloyd iterations (small data) / mini-batch steps are taken from here.
    pub max_iter: usize,
    pub seed: u64,
    /// Skip undecodable training files (logged) instead of failing.
    pub skip_bad: bool,
}

impl Default for VqConfig {
    fn default() -> Self {
        VqConfig {
            resolution: 32,
            patch: 4,
            codebook_size: 256,
            holdout: 0.1,
            max_patches: 500_000,
            max_iter: 25,
            seed: 0,
            skip_bad: false,
        }
    }
}

/// What a fit did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqFitSummary {
    pub codebook_size: u32,
    pub resolution: u32,
    pub patch: u32,
    pub grid: (u16, u16),
    pub train_images: usize,
    pub holdout_images: usize,
    pub skipped_images: usize,
    pub patches: usize,
    /// Reconstruction PSNR (dB, 8-bit RGB at the working resolution) on held-out images.
    pub psnr_holdout: f64,
    /// The same on the training images.
    pub psnr_train: f64,
    /// Mean squared patch quantization error in the normalized colour space.
    pub quantization_error: f64,
    /// `quantization_error` divided by the patches' total variance.
    pub relative_error: f64,
    pub empty_codewords: usize,
    pub iterations: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct VqHeader {
    kind: String,
    version: u32,
    resolution: u32,
    patch: u32,
    codebook_size: u32,
    dim: u32,
    norm: ColorNorm,
    seed: u64,
}

/// A VQ image tokenizer: each patch becomes the id of its nearest codeword.
#[derive(Debug, Clone, PartialEq)]
pub struct VqImageTokenizer {
    resolution: u32,
    patch: u32,
    norm: ColorNorm,
    codebook: Codebook,
    seed: u64,
}

impl VqImageTokenizer {
    /// Fits on image files (decoded in parallel).
    pub fn fit_files(paths: &[PathBuf], cfg: &VqConfig, progress: &ProgressBar) -> Result<(Self, VqFitSummary)> {
        check_config(cfg)?;
        let start = Instant::now();
        let prepared = super::prepare_files(paths, cfg.resolution, cfg.skip_bad, progress)?;
        Self::fit_prepared(prepared, cfg, progress, start)
    }

    /// Fits on decoded images.
    pub fn fit_images(images: &[DynamicImage], cfg: &VqConfig, progress: &ProgressBar) -> Result<(Self, VqFitSummary)> {
        check_config(cfg)?;
        let start = Instant::now();
        let prepared = super::prepare_images(images, cfg.resolution)?;
        Self::fit_prepared(prepared, cfg, progress, start)
    }

    fn fit_prepared(
        prepared: PreparedImages,
        cfg: &VqConfig,
        progress: &ProgressBar,
        start: Instant,
    ) -> Result<(Self, VqFitSummary)> {
        let n = prepared.images.len();
        if n == 0 {
            return Err(TokenizerError::NoData { what: "image VQ", msg: "no training images".into() });
        }
        let (train_idx, held_idx) = super::split_holdout(n, cfg.holdout, cfg.seed);
        let train: Vec<RgbImage> = train_idx.iter().map(|&i| prepared.images[i].clone()).collect();
        let norm = ColorNorm::fit(&train);
        let dim = (cfg.patch * cfg.patch * 3) as usize;
        let per_image: Vec<Vec<f32>> = train.par_iter().map(|img| patchify(img, cfg.patch, &norm)).collect();
        let mut data: Vec<f32> = per_image.concat();
        drop(per_image);
        let total = data.len() / dim;
        if total > cfg.max_patches {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x9a7c);
            let mut idx = rand::seq::index::sample(&mut rng, total, cfg.max_patches).into_vec();
            idx.sort_unstable();
            let mut sub = Vec::with_capacity(cfg.max_patches * dim);
            for i in idx {
                sub.extend_from_slice(&data[i * dim..(i + 1) * dim]);
            }
            data = sub;
        }
        let mut kcfg = KMeansConfig::new(cfg.codebook_size as usize, cfg.seed);
        kcfg.max_iter = cfg.max_iter;
        let (codebook, report) = kmeans::fit(&data, dim, &kcfg, "image VQ codebook", progress)?;
        let tok = VqImageTokenizer { resolution: cfg.resolution, patch: cfg.patch, norm, codebook, seed: cfg.seed };
        progress.set_message("measuring reconstruction");
        let held: Vec<RgbImage> = held_idx.iter().map(|&i| prepared.images[i].clone()).collect();
        let psnr_holdout = tok.psnr_of(&held);
        let psnr_train = tok.psnr_of(&train);
        let summary = VqFitSummary {
            codebook_size: cfg.codebook_size,
            resolution: cfg.resolution,
            patch: cfg.patch,
            grid: tok.grid(),
            train_images: train.len(),
            holdout_images: held.len(),
            skipped_images: prepared.skipped.len(),
            patches: data.len() / dim,
            psnr_holdout,
            psnr_train,
            quantization_error: report.inertia,
            relative_error: if report.total_variance > 0.0 { report.inertia / report.total_variance } else { 0.0 },
            empty_codewords: report.empty_codewords,
            iterations: report.iterations,
            seconds: start.elapsed().as_secs_f64(),
        };
        Ok((tok, summary))
    }

    /// PSNR over a set of squared images, from the pooled MSE (NaN when the set is empty).
    pub fn psnr_of(&self, images: &[RgbImage]) -> f64 {
        if images.is_empty() {
            return f64::NAN;
        }
        let mses: Vec<f64> =
            images.par_iter().map(|img| super::mse_u8(img.as_raw(), self.reconstruct(img).as_raw())).collect();
        super::psnr_from_mse(mses.iter().sum::<f64>() / mses.len() as f64)
    }

    /// Quantizes and reconstructs an already-squared image.
    pub fn reconstruct(&self, img: &RgbImage) -> RgbImage {
        let ids = self.codebook.assign_serial(&patchify(img, self.patch, &self.norm));
        self.ids_to_image(&ids)
    }

    /// Code ids of an already-squared `resolution`² image.
    pub fn encode_squared(&self, img: &RgbImage) -> Vec<u32> {
        self.codebook.assign_serial(&patchify(img, self.patch, &self.norm))
    }

    fn ids_to_image(&self, ids: &[u32]) -> RgbImage {
        let dim = self.codebook.dim();
        let mut patches = Vec::with_capacity(ids.len() * dim);
        for &i in ids {
            if let Some(w) = self.codebook.word(i as usize) {
                patches.extend_from_slice(w);
            }
        }
        unpatchify(&patches, self.grid(), self.patch, &self.norm)
    }

    pub fn codebook(&self) -> &Codebook {
        &self.codebook
    }

    /// Opens a VQ tokenizer file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_loaded(path, store::load(path)?)
    }

    pub(crate) fn from_loaded(path: &Path, mut loaded: store::Loaded) -> Result<Self> {
        if loaded.kind() != Some("vq") {
            return Err(TokenizerError::bad_file(
                path,
                format!("expected a VQ image tokenizer, found kind {:?}", loaded.kind()),
            ));
        }
        let h: VqHeader = loaded.header_as(path)?;
        check_geometry(h.resolution, h.patch).map_err(|e| TokenizerError::bad_file(path, e))?;
        h.norm.validate(path)?;
        if h.dim != h.patch * h.patch * 3 || !(MIN_CODEBOOK..=MAX_CODEBOOK).contains(&h.codebook_size) {
            return Err(TokenizerError::bad_file(
                path,
                format!("inconsistent header: dim {}, patch {}, codebook {}", h.dim, h.patch, h.codebook_size),
            ));
        }
        let words = loaded.take(path, "codebook", &[h.codebook_size as usize, h.dim as usize])?;
        let codebook = Codebook::new(h.dim as usize, words).map_err(|e| TokenizerError::bad_file(path, e))?;
        Ok(VqImageTokenizer { resolution: h.resolution, patch: h.patch, norm: h.norm, codebook, seed: h.seed })
    }
}

fn check_config(cfg: &VqConfig) -> Result<()> {
    check_geometry(cfg.resolution, cfg.patch)?;
    if !(MIN_CODEBOOK..=MAX_CODEBOOK).contains(&cfg.codebook_size) {
        return Err(TokenizerError::config(
            "codebook size",
            format!("{} (allowed {MIN_CODEBOOK}..={MAX_CODEBOOK})", cfg.codebook_size),
        ));
    }
    Ok(())
}

impl ImageTokenizer for VqImageTokenizer {
    fn kind(&self) -> &'static str {
        "vq"
    }

    fn resolution(&self) -> u32 {
        self.resolution
    }

    fn patch(&self) -> u32 {
        self.patch
    }

    fn vocab_size(&self) -> u32 {
        self.codebook.len() as u32
    }

    fn latent_dim(&self) -> Option<u32> {
        None
    }

    fn encode_image(&self, img: &DynamicImage, source: Option<&str>) -> Result<Segment> {
        let sq = square(img, self.resolution, source)?;
        let ids = self.encode_squared(&sq);
        Ok(Segment::tokens(Modality::Image, ids).with_meta(image_meta(self.grid(), source)))
    }

    fn decode_to_image(&self, seg: &Segment) -> Result<RgbImage> {
        let src = seg.meta.source.as_deref();
        let SegmentData::Tokens(ids) = &seg.data else {
            return Err(TokenizerError::bad_segment(
                src,
                "VQ tokenizer needs discrete image tokens, got latent vectors",
            ));
        };
        if seg.modality != Modality::Image {
            return Err(TokenizerError::bad_segment(src, format!("not an image segment ({})", seg.modality)));
        }
        check_grid(seg, self.grid())?;
        let (gh, gw) = self.grid();
        if ids.len() != gh as usize * gw as usize {
            return Err(TokenizerError::bad_segment(src, format!("{} codes for a {gh}x{gw} grid", ids.len())));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.codebook.len()) {
            return Err(TokenizerError::bad_segment(
                src,
                format!("code {bad} outside the codebook of {}", self.codebook.len()),
            ));
        }
        Ok(self.ids_to_image(ids))
    }

    fn save(&self, path: &Path) -> Result<()> {
        let h = VqHeader {
            kind: "vq".into(),
            version: 1,
            resolution: self.resolution,
            patch: self.patch,
            codebook_size: self.codebook.len() as u32,
            dim: self.codebook.dim() as u32,
            norm: self.norm,
            seed: self.seed,
        };
        store::save(
            path,
            &h,
            &[store::Tensor {
                name: "codebook",
                shape: vec![self.codebook.len(), self.codebook.dim()],
                data: self.codebook.words(),
            }],
        )
    }
}
