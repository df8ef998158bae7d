//! Images: safe decoding (limits against decompression bombs, every colour type converted to
//! RGB), resize + centre-crop, patch grids in a normalized colour space, and the
//! [`ImageTokenizer`] trait that ingest codes against — a learned VQ codebook
//! ([`VqImageTokenizer`], Chameleon setting) or continuous latent patches
//! ([`LatentImageTokenizer`], Transfusion setting). A neural VQ can implement the same trait.

pub mod latent;
pub mod vq;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader, RgbImage};
use motley_shards::{Segment, SegmentMeta};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TokenizerError};

pub use latent::{LatentConfig, LatentFitSummary, LatentImageTokenizer};
pub use vq::{VqConfig, VqFitSummary, VqImageTokenizer};

/// Largest square side images are tokenized at (fitted and pretrained tokenizers alike): a
/// pretrained VAE's mid-block attention is quadratic in latent cells, 16 GB of scores at 2048.
pub const MAX_RESOLUTION: u32 = 4096;
/// Largest patch side, in pixels (fitted) or latent cells (pretrained).
pub const MAX_PATCH: u32 = 64;

/// Largest width or height accepted from an image header.
pub const MAX_SIDE: u32 = 16_384;
/// Largest decoder allocation accepted (bytes).
pub const MAX_ALLOC: u64 = 512 * 1024 * 1024;

/// An image tokenizer: turns an image into a [`Segment`] (discrete codes or latent patch
/// vectors on a grid) and back into a picture a person can look at.
pub trait ImageTokenizer: Send + Sync + std::fmt::Debug {
    /// `"vq"` or `"latent"` (the `kind` in the saved file's header).
    fn kind(&self) -> &'static str;
    /// Side of the square the image is resized and cropped to.
    fn resolution(&self) -> u32;
    /// Side of one patch in pixels.
    fn patch(&self) -> u32;
    /// Code / patch grid (rows, cols).
    fn grid(&self) -> (u16, u16) {
        let g = (self.resolution() / self.patch().max(1)) as u16;
        (g, g)
    }
    /// Discrete vocabulary size (0 when segments are continuous).
    fn vocab_size(&self) -> u32;
    /// Vector dimension of continuous segments (None when discrete).
    fn latent_dim(&self) -> Option<u32>;
    /// Encodes an already-decoded image. `source` goes into the segment's metadata.
    fn encode_image(&self, img: &DynamicImage, source: Option<&str>) -> Result<Segment>;
    /// Reconstructs the (resized, cropped) image from a segment this tokenizer produced.
    fn decode_to_image(&self, seg: &Segment) -> Result<RgbImage>;
    /// Writes the tokenizer file (safetensors + JSON header).
    fn save(&self, path: &Path) -> Result<()>;
    /// What a corpus manifest records beside the tokenizer's file name (a pretrained model's
    /// name and latent factors); `None` for the fitted tokenizers.
    fn manifest_info(&self) -> Option<serde_json::Value> {
        None
    }

    /// Decodes image bytes (PNG, JPEG, WebP, BMP, GIF, TIFF) safely, then encodes them; `source`
    /// names them in errors.
    fn encode_bytes(&self, bytes: &[u8], source: &str) -> Result<Segment> {
        let img = decode_image_bytes(bytes, source)?;
        self.encode_image(&img, Some(source))
    }

    /// Reads and encodes an image file.
    fn encode_file(&self, path: &Path) -> Result<Segment> {
        let bytes = std::fs::read(path).map_err(|e| TokenizerError::io("read", path, e))?;
        self.encode_bytes(&bytes, &path.display().to_string())
    }

    /// Reconstruction as PNG bytes.
    fn decode_to_png(&self, seg: &Segment) -> Result<Vec<u8>> {
        png_bytes(&self.decode_to_image(seg)?)
    }
}

/// Opens an image tokenizer file of either kind.
/// A directory is a diffusers model folder (`config.json` + safetensors: AutoencoderKL or
/// VQModel), loaded with default geometry (`sample_size`, 2x2 latent patches).
pub fn load_image_tokenizer(path: impl AsRef<Path>) -> Result<Box<dyn ImageTokenizer>> {
    let path = path.as_ref();
    if path.is_dir() {
        return crate::pretrained::load_image_folder(path);
    }
    if let Some(t) = crate::pretrained::load_image_file(path, crate::store::peek_kind(path)?.as_deref())? {
        return Ok(t);
    }
    let loaded = crate::store::load(path)?;
    match loaded.kind() {
        Some("vq") => Ok(Box::new(VqImageTokenizer::from_loaded(path, loaded)?)),
        Some("latent") => Ok(Box::new(LatentImageTokenizer::from_loaded(path, loaded)?)),
        other => Err(TokenizerError::bad_file(path, format!("not an image tokenizer (kind {other:?})"))),
    }
}

/// Decodes PNG, JPEG, WebP, BMP, GIF (first frame) or TIFF bytes with dimension and allocation
/// limits; the format is told from the bytes, not from a file name.
pub fn decode_image_bytes(bytes: &[u8], source: &str) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(TokenizerError::ImageDecode { source_name: source.into(), msg: "file is empty (0 bytes)".into() });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| TokenizerError::ImageDecode { source_name: source.into(), msg: e.to_string() })?;
    if reader.format().is_none() {
        return Err(TokenizerError::ImageDecode {
            source_name: source.into(),
            msg: "unrecognized image format (expected PNG, JPEG, WebP, BMP, GIF or TIFF)".into(),
        });
    }
    let mut reader = reader;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    let decoded = crate::error::catch_panic(|| reader.decode()).map_err(|msg| TokenizerError::ImageDecode {
        source_name: source.into(),
        msg: format!("the decoder panicked: {msg}"),
    })?;
    let img = decoded.map_err(|e| match e {
        image::ImageError::Limits(l) => TokenizerError::ImageTooLarge {
            source_name: source.into(),
            msg: format!("{l} (limits: {MAX_SIDE} pixels a side, {} MiB decoded)", MAX_ALLOC >> 20),
        },
        other => TokenizerError::ImageDecode { source_name: source.into(), msg: other.to_string() },
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(TokenizerError::ImageEmpty {
            source_name: source.into(),
            width: img.width(),
            height: img.height(),
        });
    }
    Ok(img)
}

/// Reads and safely decodes an image file.
pub fn read_image(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| TokenizerError::io("read", path, e))?;
    decode_image_bytes(&bytes, &path.display().to_string())
}

/// Any colour type (grey, grey+alpha, 16-bit, RGBA...) to 8-bit RGB; alpha is composited on white.
pub fn to_rgb8(img: &DynamicImage) -> RgbImage {
    if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let (w, h) = rgba.dimensions();
        let mut out = RgbImage::new(w, h);
        for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
            let a = p.0[3] as u32;
            for c in 0..3 {
                o.0[c] = ((p.0[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
            }
        }
        out
    } else {
        img.to_rgb8()
    }
}

/// Centre-crops to a square and resizes it to `resolution`² (bilinear / area-averaging).
pub fn square(img: &DynamicImage, resolution: u32, source: Option<&str>) -> Result<RgbImage> {
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 {
        return Err(TokenizerError::ImageEmpty {
            source_name: source.unwrap_or("<image>").into(),
            width: w,
            height: h,
        });
    }
    let side = w.min(h);
    let rgb = to_rgb8(img);
    let cropped = if w == h {
        rgb
    } else {
        image::imageops::crop_imm(&rgb, (w - side) / 2, (h - side) / 2, side, side).to_image()
    };
    if side == resolution {
        return Ok(cropped);
    }
    // Triangle is bilinear when upscaling and a box-like average when downscaling.
    Ok(image::imageops::resize(&cropped, resolution, resolution, image::imageops::FilterType::Triangle))
}

/// Per-channel normalization of [0, 1] RGB: `(v - mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ColorNorm {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for ColorNorm {
    fn default() -> Self {
        ColorNorm { mean: [0.5; 3], std: [0.25; 3] }
    }
}

impl ColorNorm {
    /// Fits mean and standard deviation per channel over all pixels (sequential: deterministic).
    pub fn fit(images: &[RgbImage]) -> Self {
        let mut s = [0f64; 3];
        let mut s2 = [0f64; 3];
        let mut n = 0f64;
        for img in images {
            for p in img.pixels() {
                for c in 0..3 {
                    let v = p.0[c] as f64 / 255.0;
                    s[c] += v;
                    s2[c] += v * v;
                }
                n += 1.0;
            }
        }
        if n == 0.0 {
            return ColorNorm::default();
        }
        let mut out = ColorNorm::default();
        for c in 0..3 {
            let m = s[c] / n;
            let var = (s2[c] / n - m * m).max(0.0);
            out.mean[c] = m as f32;
            // Floor keeps flat (e.g. greyscale-only) channels from blowing up.
            out.std[c] = var.sqrt().max(1e-2) as f32;
        }
        out
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || self.mean.iter().any(|m| !m.is_finite()) {
            return Err(TokenizerError::bad_file(path, "colour normalization has a non-positive or non-finite value"));
        }
        Ok(())
    }
}

/// Cuts a `resolution`² RGB image into a row-major grid of patches, each flattened as
/// (y, x, channel) in the normalized colour space. Returns `grid² × patch²·3` values.
pub fn patchify(img: &RgbImage, patch: u32, norm: &ColorNorm) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let (gw, gh) = (w / patch, h / patch);
    let p = patch as usize;
    let mut out = Vec::with_capacity((gw * gh) as usize * p * p * 3);
    let inv_std = norm.std.map(|s| 1.0 / s);
    let raw = img.as_raw();
    for gy in 0..gh as usize {
        for gx in 0..gw as usize {
            for y in 0..p {
                let row = (gy * p + y) * w as usize * 3 + gx * p * 3;
                for x in 0..p {
                    for c in 0..3 {
                        let v = raw[row + x * 3 + c] as f32 / 255.0;
                        out.push((v - norm.mean[c]) * inv_std[c]);
                    }
                }
            }
        }
    }
    out
}

/// Inverse of [`patchify`]: reassembles `grid` patches into an RGB image.
pub fn unpatchify(patches: &[f32], grid: (u16, u16), patch: u32, norm: &ColorNorm) -> RgbImage {
    let p = patch as usize;
    let (gh, gw) = (grid.0 as usize, grid.1 as usize);
    let (w, h) = (gw * p, gh * p);
    let mut img = RgbImage::new(w as u32, h as u32);
    let dim = p * p * 3;
    let buf: &mut [u8] = &mut img;
    for (i, pv) in patches.chunks_exact(dim).enumerate().take(gh * gw) {
        let (gy, gx) = (i / gw, i % gw);
        for y in 0..p {
            let row = (gy * p + y) * w * 3 + gx * p * 3;
            for x in 0..p {
                for c in 0..3 {
                    let v = pv[(y * p + x) * 3 + c] * norm.std[c] + norm.mean[c];
                    buf[row + x * 3 + c] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    img
}

/// Peak signal-to-noise ratio in dB between two same-sized 8-bit images (∞ when equal).
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let mse = mse_u8(a.as_raw(), b.as_raw());
    psnr_from_mse(mse)
}

pub(crate) fn mse_u8(a: &[u8], b: &[u8]) -> f64 {
    let n = a.len().min(b.len());
    if n == 0 {
        return 0.0;
    }
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / n as f64
}

pub(crate) fn psnr_from_mse(mse: f64) -> f64 {
    if mse <= 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
}

/// PNG-encodes an RGB image.
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| TokenizerError::Render { what: "PNG", msg: e.to_string() })?;
    Ok(out)
}

/// Checks resolution / patch / grid limits shared by both image tokenizers.
pub(crate) fn check_geometry(resolution: u32, patch: u32) -> Result<()> {
    if patch == 0 || resolution == 0 || !resolution.is_multiple_of(patch) {
        return Err(TokenizerError::config(
            "image geometry",
            format!("resolution {resolution} must be a positive multiple of patch {patch}"),
        ));
    }
    if resolution > MAX_RESOLUTION || patch > MAX_PATCH {
        return Err(TokenizerError::config(
            "image geometry",
            format!("resolution {resolution} / patch {patch} too large (max {MAX_RESOLUTION} / {MAX_PATCH})"),
        ));
    }
    Ok(())
}

/// Training images, already squared to the target resolution, with their names.
#[derive(Debug, Clone)]
pub struct PreparedImages {
    pub names: Vec<String>,
    pub images: Vec<RgbImage>,
    /// Files that could not be decoded and were skipped (only with `skip_bad`), with the reason.
    pub skipped: Vec<String>,
}

/// Reads, decodes and squares image files in parallel. With `skip_bad` undecodable files are
/// logged and skipped; otherwise the first one (in input order) is the error.
pub fn prepare_files(
    paths: &[PathBuf],
    resolution: u32,
    skip_bad: bool,
    progress: &indicatif::ProgressBar,
) -> Result<PreparedImages> {
    progress.set_length(paths.len() as u64);
    progress.set_position(0);
    progress.set_message("reading images");
    let results: Vec<Result<RgbImage>> = paths
        .par_iter()
        .map(|p| {
            let r = read_image(p).and_then(|img| square(&img, resolution, Some(&p.display().to_string())));
            progress.inc(1);
            r
        })
        .collect();
    let mut out = PreparedImages { names: Vec::new(), images: Vec::new(), skipped: Vec::new() };
    for (p, r) in paths.iter().zip(results) {
        match r {
            Ok(img) => {
                out.names.push(p.display().to_string());
                out.images.push(img);
            }
            Err(e) if skip_bad => {
                tracing::warn!("skipping {e}");
                out.skipped.push(e.to_string());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Squares in-memory images (for callers that already hold decoded images).
pub fn prepare_images(images: &[DynamicImage], resolution: u32) -> Result<PreparedImages> {
    let squared: Result<Vec<RgbImage>> = images.par_iter().map(|i| square(i, resolution, None)).collect();
    Ok(PreparedImages {
        names: (0..images.len()).map(|i| format!("image#{i}")).collect(),
        images: squared?,
        skipped: Vec::new(),
    })
}

/// Deterministic train / held-out split: a seeded shuffle, `holdout` fraction (≥ 1 image when
/// there are ≥ 2, never all of them).
pub(crate) fn split_holdout(n: usize, holdout: f32, seed: u64) -> (Vec<usize>, Vec<usize>) {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x005e_ed0f_4e1d);
    idx.shuffle(&mut rng);
    let mut h = ((n as f32) * holdout.clamp(0.0, 0.9)).round() as usize;
    if holdout > 0.0 && n >= 2 {
        h = h.clamp(1, n - 1);
    } else {
        h = 0;
    }
    let mut held: Vec<usize> = idx[..h].to_vec();
    let mut train: Vec<usize> = idx[h..].to_vec();
    held.sort_unstable();
    train.sort_unstable();
    (train, held)
}

/// Metadata for an image segment.
pub(crate) fn image_meta(grid: (u16, u16), source: Option<&str>) -> SegmentMeta {
    SegmentMeta { grid: Some(grid), frame_rate: None, source: source.map(str::to_string) }
}

/// Checks a segment's grid against the tokenizer's.
/// The latent vectors of an image segment, checked against a latent tokenizer's grid and
/// vector dimension (`who` names the tokenizer in the error).
pub(crate) fn latent_image_data<'a>(
    seg: &'a Segment,
    grid: (u16, u16),
    dim: u32,
    who: &str,
) -> Result<&'a [half::f16]> {
    let src = seg.meta.source.as_deref();
    let motley_shards::SegmentData::Latent { dim: d, data } = &seg.data else {
        return Err(TokenizerError::bad_segment(src, format!("{who} needs latent vectors, got discrete tokens")));
    };
    if seg.modality != motley_shards::Modality::Image {
        return Err(TokenizerError::bad_segment(src, format!("not an image segment ({})", seg.modality)));
    }
    check_grid(seg, grid)?;
    let (gh, gw) = grid;
    if *d != dim || data.len() != gh as usize * gw as usize * dim as usize {
        return Err(TokenizerError::bad_segment(
            src,
            format!("{} values of dimension {d}; expected {gh}x{gw} vectors of dimension {dim}", data.len()),
        ));
    }
    Ok(data)
}

pub(crate) fn check_grid(seg: &Segment, grid: (u16, u16)) -> Result<()> {
    if let Some(g) = seg.meta.grid
        && g != grid
    {
        return Err(TokenizerError::bad_segment(
            seg.meta.source.as_deref(),
            format!("segment grid {}x{} differs from the tokenizer's {}x{}", g.0, g.1, grid.0, grid.1),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn patchify_roundtrip_is_exact() {
        let img = RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, ((x + y) * 10) as u8]));
        let norm = ColorNorm { mean: [0.4, 0.5, 0.6], std: [0.2, 0.3, 0.25] };
        let p = patchify(&img, 4, &norm);
        assert_eq!(p.len(), 4 * 48);
        let back = unpatchify(&p, (2, 2), 4, &norm);
        assert_eq!(back, img);
        assert!(psnr(&back, &img).is_infinite());
    }

    #[test]
    fn square_crops_centre_and_resizes() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(40, 20, |x, _| {
            image::Rgb([if (10..30).contains(&x) { 0 } else { 255 }, 0, 0])
        }));
        let s = square(&img, 20, None).unwrap();
        assert_eq!(s.dimensions(), (20, 20));
        assert!(s.pixels().all(|p| p.0[0] == 0), "centre crop should drop the red borders");
        assert_eq!(square(&img, 8, None).unwrap().dimensions(), (8, 8));
    }

    #[test]
    fn alpha_composites_on_white() {
        let img = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(2, 2, image::Rgba([0, 0, 0, 0])));
        assert!(to_rgb8(&img).pixels().all(|p| p.0 == [255, 255, 255]));
    }

    #[test]
    fn holdout_split_is_seeded_and_disjoint() {
        let (t, h) = split_holdout(10, 0.2, 1);
        assert_eq!((t.len(), h.len()), (8, 2));
        assert_eq!(split_holdout(10, 0.2, 1), (t.clone(), h.clone()));
        assert!(h.iter().all(|i| !t.contains(i)));
        assert_eq!(split_holdout(1, 0.5, 1).1.len(), 0);
    }
}
