//! Codebook files: f32 tensors in safetensors, with the tokenizer's JSON header stored in
//! the safetensors metadata under `motley`, so one file holds everything needed to load it.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, TokenizerError};

/// Metadata key holding the JSON header.
pub const HEADER_KEY: &str = "motley";

/// The header `version` every tokenizer file this build writes carries, and the only one it
/// reads: a file from a newer motley may mean something else by the same keys.
pub const HEADER_VERSION: u64 = 1;

/// Refuses a header whose `version` is not [`HEADER_VERSION`] (a missing one is refused too:
/// every file motley ever wrote has it).
pub fn check_version(header: &serde_json::Value, path: &Path) -> Result<()> {
    match header.get("version").and_then(|v| v.as_u64()) {
        Some(HEADER_VERSION) => Ok(()),
        Some(v) => Err(TokenizerError::bad_file(
            path,
            format!("header version {v}: this build reads version {HEADER_VERSION} (written by a newer motley?)"),
        )),
        None => Err(TokenizerError::bad_file(path, "header has no numeric `version`")),
    }
}

/// A named f32 tensor to save.
#[derive(Debug)]
pub struct Tensor<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

/// Writes `header` and `tensors` to `path` (atomically: temp file, then rename).
pub fn save<H: Serialize>(path: &Path, header: &H, tensors: &[Tensor<'_>]) -> Result<()> {
    let json = serde_json::to_string(header).map_err(|e| TokenizerError::bad_file(path, format!("header: {e}")))?;
    let mut meta = HashMap::new();
    meta.insert(HEADER_KEY.to_string(), json);
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| bytemuck::cast_slice::<f32, u8>(t.data).to_vec()).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bytes) {
        let v = TensorView::new(Dtype::F32, t.shape.clone(), b)
            .map_err(|e| TokenizerError::bad_file(path, format!("tensor {}: {e}", t.name)))?;
        views.push((t.name.to_string(), v));
    }
    let buf = safetensors::serialize(views, Some(meta)).map_err(|e| TokenizerError::bad_file(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| TokenizerError::io("create directory", dir, e))?;
    }
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &buf).map_err(|e| TokenizerError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TokenizerError::io("rename into", path, e))?;
    Ok(())
}

/// The `motley` header JSON of a safetensors buffer, without reading its tensors.
pub fn header_json(buf: &[u8], path: &Path) -> Result<String> {
    let (_, meta) = SafeTensors::read_metadata(buf)
        .map_err(|e| TokenizerError::bad_file(path, format!("not a safetensors file: {e}")))?;
    meta.metadata()
        .as_ref()
        .and_then(|m| m.get(HEADER_KEY))
        .cloned()
        .ok_or_else(|| TokenizerError::bad_file(path, format!("no `{HEADER_KEY}` header in the safetensors metadata")))
}

/// The header's `kind` of a tokenizer file, reading only the safetensors header (a pretrained
/// model's file can be hundreds of MB).
pub fn peek_kind(path: &Path) -> Result<Option<String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| TokenizerError::io("open", path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| TokenizerError::io("read", path, e))?;
    let n = u64::from_le_bytes(len);
    // safetensors caps its header at 100 MB; a larger claim is not a tokenizer file.
    if n > 100_000_000 {
        return Err(TokenizerError::bad_file(path, format!("safetensors header of {n} bytes")));
    }
    let mut head = vec![0u8; 8 + n as usize];
    head[..8].copy_from_slice(&len);
    f.read_exact(&mut head[8..]).map_err(|e| TokenizerError::io("read", path, e))?;
    let json: serde_json::Value = serde_json::from_slice(&head[8..])
        .map_err(|e| TokenizerError::bad_file(path, format!("not a safetensors file: {e}")))?;
    let Some(h) = json.get("__metadata__").and_then(|m| m.get(HEADER_KEY)).and_then(|h| h.as_str()) else {
        return Ok(None);
    };
    let h: serde_json::Value =
        serde_json::from_str(h).map_err(|e| TokenizerError::bad_file(path, format!("header JSON: {e}")))?;
    Ok(h.get("kind").and_then(|k| k.as_str()).map(str::to_string))
}

/// Writes the tensors of the safetensors buffer `weights` (read from `from`) unchanged, dtypes
/// included, under `header`: how a pretrained model becomes one tokenizer file.
pub fn save_raw<H: Serialize>(path: &Path, header: &H, weights: &[u8], from: &Path) -> Result<()> {
    let json = serde_json::to_string(header).map_err(|e| TokenizerError::bad_file(path, format!("header: {e}")))?;
    let st =
        SafeTensors::deserialize(weights).map_err(|e| TokenizerError::model(from, format!("not safetensors: {e}")))?;
    let mut meta = HashMap::new();
    meta.insert(HEADER_KEY.to_string(), json);
    let views: Vec<(String, TensorView<'_>)> = st.tensors();
    let buf = safetensors::serialize(views, Some(meta)).map_err(|e| TokenizerError::bad_file(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| TokenizerError::io("create directory", dir, e))?;
    }
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &buf).map_err(|e| TokenizerError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TokenizerError::io("rename into", path, e))?;
    Ok(())
}

/// A loaded codebook file: its JSON header and f32 tensors by name.
#[derive(Debug)]
pub struct Loaded {
    pub header: serde_json::Value,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Loaded {
    /// The header's `kind` field (`vq`, `latent`, `speech-units`).
    pub fn kind(&self) -> Option<&str> {
        self.header.get("kind").and_then(|k| k.as_str())
    }

    pub fn header_as<H: DeserializeOwned>(&self, path: &Path) -> Result<H> {
        check_version(&self.header, path)?;
        serde_json::from_value(self.header.clone()).map_err(|e| TokenizerError::bad_file(path, format!("header: {e}")))
    }

    /// Takes a tensor, checking its shape.
    pub fn take(&mut self, path: &Path, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (s, d) = self
            .tensors
            .remove(name)
            .ok_or_else(|| TokenizerError::bad_file(path, format!("missing tensor `{name}`")))?;
        if s != shape {
            return Err(TokenizerError::bad_file(
                path,
                format!("tensor `{name}` has shape {s:?}, header says {shape:?}"),
            ));
        }
        if d.iter().any(|v| !v.is_finite()) {
            return Err(TokenizerError::bad_file(path, format!("tensor `{name}` holds NaN or infinity")));
        }
        Ok(d)
    }
}

/// Reads a file written by [`save`].
pub fn load(path: &Path) -> Result<Loaded> {
    let buf = std::fs::read(path).map_err(|e| TokenizerError::io("read", path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&buf)
        .map_err(|e| TokenizerError::bad_file(path, format!("not a safetensors file: {e}")))?;
    let header_json = meta.metadata().as_ref().and_then(|m| m.get(HEADER_KEY)).ok_or_else(|| {
        TokenizerError::bad_file(path, format!("no `{HEADER_KEY}` header in the safetensors metadata"))
    })?;
    let header: serde_json::Value =
        serde_json::from_str(header_json).map_err(|e| TokenizerError::bad_file(path, format!("header JSON: {e}")))?;
    let st = SafeTensors::deserialize(&buf).map_err(|e| TokenizerError::bad_file(path, e))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(TokenizerError::bad_file(path, format!("tensor `{name}` is {:?}, expected F32", view.dtype())));
        }
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    Ok(Loaded { header, tensors })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_shape_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        save(
            &p,
            &serde_json::json!({"kind": "vq", "k": 2}),
            &[Tensor { name: "codebook", shape: vec![2, 3], data: &data }],
        )
        .unwrap();
        let mut l = load(&p).unwrap();
        assert_eq!(l.kind(), Some("vq"));
        assert!(l.take(&p, "codebook", &[3, 2]).is_err());
        let mut l2 = load(&p).unwrap();
        assert_eq!(l2.take(&p, "codebook", &[2, 3]).unwrap(), data);
        std::fs::write(&p, b"garbage").unwrap();
        assert!(matches!(load(&p), Err(TokenizerError::BadFile { .. })));
    }
}
