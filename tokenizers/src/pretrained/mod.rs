//! Pretrained neural tokenizers loaded from Hugging Face model folders (`config.json` +
//! safetensors in diffusers' or transformers' layout), run by candle on the CPU or, in builds
//! with the `cuda` feature, a CUDA GPU ([`device`]): diffusers
//! `AutoencoderKL` and `VQModel` for images, transformers `MimiModel` for speech.
//!
//! The network code is candle-transformers' (its Stable Diffusion VAE blocks load diffusers'
//! weight names as they are, its Mimi transformers'); this module reads the folder, checks the architecture named in
//! `config.json`, and turns candle's errors into [`TokenizerError::Model`] naming the file and
//! the tensor. A loaded model can be saved as one motley tokenizer file (the model's own
//! safetensors bytes plus a `motley` header holding its `config.json` and motley's geometry),
//! so a corpus manifest names one self-contained file as for the fitted tokenizers.

pub mod device;
pub mod mimi;
pub mod vae;
pub mod vq;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use safetensors::SafeTensors;

use crate::error::{Result, TokenizerError};

pub use device::{EncoderDevice, device_name, encoder_device, set_encoder_device};
pub use mimi::MimiTokenizer;
pub use vae::{AutoencoderKlTokenizer, VaeOptions};
pub use vq::VqModelTokenizer;

/// Weight file names tried in a model folder, in order.
pub const WEIGHT_FILES: &[&str] = &["diffusion_pytorch_model.safetensors", "model.safetensors"];

/// A model folder as diffusers / transformers `save_pretrained` writes it.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub weights_path: PathBuf,
    /// `config.json`, parsed.
    pub config: serde_json::Value,
}

/// The architectures motley can run, as `config.json` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// diffusers `AutoencoderKL` (`_class_name`).
    AutoencoderKl,
    /// diffusers `VQModel`.
    VqModel,
    /// transformers `MimiModel` (`architectures[0]` or `model_type = "mimi"`).
    Mimi,
}

impl ModelFolder {
    /// Opens `dir`: reads `config.json` and finds the weights; reads no tensors yet.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| TokenizerError::io("read", &config_path, e))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TokenizerError::model(&config_path, format!("not JSON: {e}")))?;
        let weights_path = WEIGHT_FILES.iter().map(|f| dir.join(f)).find(|p| p.is_file()).ok_or_else(|| {
            TokenizerError::model(
                &dir,
                format!("no weights: expected one of {} (safetensors)", WEIGHT_FILES.join(", ")),
            )
        })?;
        Ok(ModelFolder { dir, config_path, weights_path, config })
    }

    /// The architecture `config.json` names (diffusers `_class_name`, transformers
    /// `architectures[0]` / `model_type`); anything motley cannot run is an error naming it.
    pub fn architecture(&self) -> Result<Architecture> {
        architecture_of(&self.config, &self.config_path)
    }

    /// The weights as f32 candle tensors by name.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let buf = std::fs::read(&self.weights_path).map_err(|e| TokenizerError::io("read", &self.weights_path, e))?;
        tensors_from_bytes(&buf, &self.weights_path)
    }
}

/// The architecture named by a diffusers or transformers `config.json`.
pub fn architecture_of(config: &serde_json::Value, path: &Path) -> Result<Architecture> {
    let class = config.get("_class_name").and_then(|v| v.as_str());
    let arch = config.get("architectures").and_then(|v| v.get(0)).and_then(|v| v.as_str());
    let model_type = config.get("model_type").and_then(|v| v.as_str());
    match (class, arch, model_type) {
        (Some("AutoencoderKL"), _, _) => Ok(Architecture::AutoencoderKl),
        (Some("VQModel"), _, _) => Ok(Architecture::VqModel),
        (None, Some("MimiModel"), _) | (None, None, Some("mimi")) => Ok(Architecture::Mimi),
        (None, None, None) => Err(TokenizerError::model(
            path,
            "names no architecture (no `_class_name`, `architectures` or `model_type`)",
        )),
        _ => Err(TokenizerError::model(
            path,
            format!(
                "unknown architecture {}; motley runs diffusers AutoencoderKL and VQModel, transformers MimiModel",
                class.or(arch).or(model_type).unwrap_or_default()
            ),
        )),
    }
}

/// An image model folder, dispatched on the architecture its `config.json` names; default
/// geometry (`sample_size`; 2x2 latent patches for an AutoencoderKL).
pub fn load_image_folder(dir: &Path) -> Result<Box<dyn crate::image::ImageTokenizer>> {
    match ModelFolder::open(dir)?.architecture()? {
        Architecture::AutoencoderKl => Ok(Box::new(AutoencoderKlTokenizer::from_folder(dir, VaeOptions::default())?)),
        Architecture::VqModel => Ok(Box::new(VqModelTokenizer::from_folder(dir, None)?)),
        Architecture::Mimi => Err(TokenizerError::model(
            dir.join("config.json"),
            "MimiModel is a speech codec, not an image model (give it as the speech tokenizer)",
        )),
    }
}

/// A speech codec: a transformers model folder (all its codebooks) or a saved codec file;
/// `None` when `path` is neither (a fitted unit file, say).
pub fn load_speech(path: &Path) -> Result<Option<Box<dyn crate::speech::AudioTokenizer>>> {
    if path.is_dir() {
        return match ModelFolder::open(path)?.architecture()? {
            Architecture::Mimi => Ok(Some(Box::new(MimiTokenizer::from_folder(path, None)?))),
            other => Err(TokenizerError::model(
                path.join("config.json"),
                format!("{other:?} is an image model, not a speech codec (give it as the image tokenizer)"),
            )),
        };
    }
    Ok(match crate::store::peek_kind(path)?.as_deref() {
        Some(mimi::KIND) => Some(Box::new(MimiTokenizer::load(path)?)),
        _ => None,
    })
}

/// A saved pretrained image tokenizer file of `kind`, or `None` when `kind` is not one.
pub fn load_image_file(path: &Path, kind: Option<&str>) -> Result<Option<Box<dyn crate::image::ImageTokenizer>>> {
    Ok(match kind {
        Some(vae::KIND) => Some(Box::new(AutoencoderKlTokenizer::load(path)?)),
        Some(vq::KIND) => Some(Box::new(VqModelTokenizer::load(path)?)),
        _ => None,
    })
}

/// [`load_image_folder`] / [`load_image_file`] as a [`crate::ModalityTokenizer`]; `None` when
/// `path` is neither a model folder nor a pretrained tokenizer file.
pub fn load_modality(path: &Path) -> Result<Option<Box<dyn crate::ModalityTokenizer>>> {
    let arch = if path.is_dir() {
        Some(ModelFolder::open(path)?.architecture()?)
    } else {
        match crate::store::peek_kind(path)?.as_deref() {
            Some(vae::KIND) => return Ok(Some(Box::new(AutoencoderKlTokenizer::load(path)?))),
            Some(vq::KIND) => return Ok(Some(Box::new(VqModelTokenizer::load(path)?))),
            Some(mimi::KIND) => return Ok(Some(Box::new(crate::Speech(Box::new(MimiTokenizer::load(path)?))))),
            _ => None,
        }
    };
    Ok(match arch {
        Some(Architecture::AutoencoderKl) => {
            Some(Box::new(AutoencoderKlTokenizer::from_folder(path, VaeOptions::default())?))
        }
        Some(Architecture::VqModel) => Some(Box::new(VqModelTokenizer::from_folder(path, None)?)),
        Some(Architecture::Mimi) => Some(Box::new(crate::Speech(Box::new(MimiTokenizer::from_folder(path, None)?)))),
        None => None,
    })
}

/// A pretrained tokenizer file (`save_raw`: the model's safetensors plus the `motley` header):
/// its header, checked to be of `kind`, and its tensors.
pub(crate) fn read_saved<H: serde::de::DeserializeOwned>(
    path: &Path,
    kind: &str,
) -> Result<(H, HashMap<String, Tensor>)> {
    let buf = std::fs::read(path).map_err(|e| TokenizerError::io("read", path, e))?;
    let header: serde_json::Value = serde_json::from_str(&crate::store::header_json(&buf, path)?)
        .map_err(|e| TokenizerError::bad_file(path, format!("header: {e}")))?;
    let found = header.get("kind").and_then(|k| k.as_str());
    if found != Some(kind) {
        return Err(TokenizerError::bad_file(path, format!("expected kind {kind:?}, found {found:?}")));
    }
    crate::store::check_version(&header, path)?;
    let header = serde_json::from_value(header).map_err(|e| TokenizerError::bad_file(path, format!("header: {e}")))?;
    Ok((header, tensors_from_bytes(&buf, path)?))
}

/// diffusers' `VaeImageProcessor` input: `2·(v/255) − 1`, planar RGB.
pub(crate) fn pixels_in(img: &image::RgbImage) -> Vec<f32> {
    let mut px = Vec::with_capacity(3 * img.width() as usize * img.height() as usize);
    for ch in 0..3 {
        px.extend(img.pixels().map(|p| 2.0 * (p.0[ch] as f32 / 255.0) - 1.0));
    }
    px
}

/// diffusers' post-processing to 8 bits of planar RGB already mapped to [0, 1]: ×255, round.
pub(crate) fn pixels_out(v: &[f32], side: u32) -> image::RgbImage {
    let plane = side as usize * side as usize;
    image::RgbImage::from_fn(side, side, |x, y| {
        let k = y as usize * side as usize + x as usize;
        let q = |ch: usize| (v[ch * plane + k] * 255.0).round().clamp(0.0, 255.0) as u8;
        image::Rgb([q(0), q(1), q(2)])
    })
}

/// Every tensor of a safetensors buffer as f32 on the CPU (f16 / bf16 weights are widened:
/// the encoders run in f32, the precision the parity tests hold them to).
pub(crate) fn tensors_from_bytes(buf: &[u8], path: &Path) -> Result<HashMap<String, Tensor>> {
    let st = SafeTensors::deserialize(buf).map_err(|e| TokenizerError::model(path, format!("not safetensors: {e}")))?;
    let mut out = HashMap::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(TokenizerError::model(path, format!("tensor `{name}` is {other:?}; expected a float")));
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| TokenizerError::model(path, format!("tensor `{name}`: {e}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// A var builder over `tensors` that moves each onto `device` as the model takes it; a missing
/// or misshapen tensor surfaces as candle's error naming it, which [`candle_call`] wraps with
/// the file.
pub(crate) fn var_builder(tensors: HashMap<String, Tensor>, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_tensors(tensors, DType::F32, device)
}

/// Runs candle work (`op`: "load", "encode", "decode") on the model in `path`, its error or
/// panic as [`TokenizerError::Model`] naming the file. candle asserts on some inputs instead of
/// returning an error (a zero-layer transformer indexes `layers[0]`, a zero `compress`
/// divides by it); the config checks refuse the ones known, and this keeps an unknown one
/// from aborting a long ingest: the record fails as a bad input does.
pub(crate) fn candle_call<T>(path: &Path, op: &str, f: impl FnOnce() -> candle_core::Result<T>) -> Result<T> {
    match crate::error::catch_panic(f) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(TokenizerError::model(path, format!("{op}: {}", candle_message(&e)))),
        Err(msg) => Err(TokenizerError::model(path, format!("{op}: candle panicked: {msg}"))),
    }
}

/// candle's message without its backtrace, on one line.
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    let s = e.to_string();
    let s = s.lines().next().unwrap_or_default().trim().to_string();
    // candle's attention block reads diffusers' current names (to_q, to_k, to_v, to_out.0) and
    // falls back to the pre-0.14 ones, so a missing `to_q` is reported as a missing `query`:
    // name both.
    for (old, new) in [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")]
    {
        if let Some(name) = s.strip_prefix("cannot find tensor ").filter(|n| n.contains(old)) {
            return format!("cannot find tensor {} (nor its older name {name})", name.replacen(old, new, 1));
        }
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_candle_is_an_error_naming_the_file_and_step() {
        let p = Path::new("m/model.safetensors");
        let e = candle_call(p, "encode", || -> candle_core::Result<()> { panic!("index out of bounds") })
            .unwrap_err()
            .to_string();
        assert!(e.contains("m/model.safetensors") && e.contains("encode") && e.contains("index out of bounds"), "{e}");
        let e = candle_call(p, "load", || -> candle_core::Result<()> { Err(candle_core::Error::Msg("bad".into())) })
            .unwrap_err()
            .to_string();
        assert!(e.contains("load: bad"), "{e}");
        assert_eq!(candle_call(p, "decode", || Ok(3)).unwrap(), 3);
    }
}
