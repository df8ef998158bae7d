//! A dense checkpoint as a Hugging Face transformers model folder, loadable with
//! `AutoModelForCausalLM.from_pretrained`: with QK-norm it is Qwen3's computation, without it
//! Llama's (docs/MODEL.md §10), after renaming the tensors. MoT and MoE have no transformers
//! class, and the "swin" norm placement and the Transfusion head no counterpart there: those
//! are refused (`scripts/reference/mot_model.py` runs any token-setting checkpoint in PyTorch).

use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::Tensor;

use crate::checkpoint;
use crate::error::TrainError;
use crate::model::{Arch, NormPlacement};

/// What [`export_transformers`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub checkpoint: PathBuf,
    pub step: u64,
    pub out: PathBuf,
    /// `Qwen3ForCausalLM` or `LlamaForCausalLM`.
    pub architecture: String,
    pub tensors: usize,
    pub parameters: i64,
}

/// transformers' name of a motley dense tensor (docs/MODEL.md §7 and §10).
fn hf_name(name: &str) -> Option<String> {
    let simple = match name {
        "embed.weight" => Some("model.embed_tokens.weight"),
        "norm.weight" => Some("model.norm.weight"),
        "lm_head.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = name.strip_prefix("layers.")?;
    let (l, part) = rest.split_once('.')?;
    l.parse::<u32>().ok()?;
    let part = match part {
        "attn_norm.weight" => "input_layernorm.weight".to_string(),
        "ffn_norm.weight" => "post_attention_layernorm.weight".to_string(),
        p => {
            let (module, tail) = p.split_once('.')?;
            let proj = tail.strip_suffix(".weight")?;
            let ok = match module {
                "attn" => ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"].contains(&proj),
                "ffn" => ["gate_proj", "up_proj", "down_proj"].contains(&proj),
                _ => false,
            };
            if !ok {
                return None;
            }
            format!("{}.{proj}.weight", if module == "attn" { "self_attn" } else { "mlp" })
        }
    };
    Some(format!("model.layers.{l}.{part}"))
}

/// Writes `config.json`, `model.safetensors` and `motley.json` (the vocabulary layout: which
/// global ids are text, specials, image codes and speech units) for the checkpoint `ckpt`
/// (a checkpoint folder or a run: its latest) into `out`, which must not hold a model already.
pub fn export_transformers(ckpt: &Path, out: &Path) -> Result<ExportReport, TrainError> {
    let ckpt = checkpoint::resolve(ckpt)?;
    let meta = checkpoint::read_meta(&ckpt)?;
    let m = &meta.config.model;
    let refuse = |msg: String| Err(TrainError::Checkpoint { path: ckpt.clone(), msg });
    if m.arch != Arch::Dense {
        return refuse(format!(
            "a {} checkpoint has no transformers class (each token picks its tower's weights); only dense \
             checkpoints export. scripts/reference/mot_model.py runs it in plain PyTorch",
            m.arch
        ));
    }
    if m.norm != NormPlacement::Pre {
        return refuse("model.norm = \"swin\" (norms after attention and FFN) has no Llama/Qwen3 counterpart".into());
    }
    if m.latent_dim > 0 {
        return refuse("a Transfusion checkpoint (latent_dim > 0) has no transformers class".into());
    }
    if out.join("config.json").exists() || out.join("model.safetensors").exists() {
        return Err(TrainError::RunDir { path: out.to_path_buf(), msg: "already holds a model".into() });
    }
    let tensors = checkpoint::read_model(&ckpt)?;
    let mut renamed: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
    let mut parameters = 0i64;
    for (name, t) in tensors {
        let hf = hf_name(&name).ok_or_else(|| TrainError::Checkpoint {
            path: ckpt.clone(),
            msg: format!("tensor {name} has no place in a Llama/Qwen3 model"),
        })?;
        parameters += t.numel() as i64;
        renamed.push((hf, t));
    }
    renamed.sort_by(|a, b| a.0.cmp(&b.0));
    let vocab = meta.vocab.clone().ok_or_else(|| TrainError::Checkpoint {
        path: ckpt.join(checkpoint::META_FILE),
        msg: "records no vocabulary (written before checkpoints kept it)".into(),
    })?;
    let shape = |n: &str| renamed.iter().find(|(k, _)| k == n).map(|(_, t)| t.size());
    let ffn = shape("model.layers.0.mlp.gate_proj.weight").and_then(|s| s.first().copied()).unwrap_or(0);
    let vocab_size = shape("model.embed_tokens.weight").and_then(|s| s.first().copied()).unwrap_or(0);
    let (architecture, model_type) =
        if m.qk_norm { ("Qwen3ForCausalLM", "qwen3") } else { ("LlamaForCausalLM", "llama") };
    let special = |n: &str| vocab.special(n);
    let config = serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": ffn,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads,
        "head_dim": m.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": meta.config.data.seq_len.max(2048),
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "tie_word_embeddings": false,
        "use_sliding_window": false,
        "bos_token_id": special("bos"),
        "eos_token_id": special("eos"),
        "pad_token_id": special("pad"),
        "torch_dtype": "float32",
    });
    std::fs::create_dir_all(out).map_err(TrainError::io("create", out))?;
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).unwrap_or_default();
    checkpoint::write_atomic(&out.join("config.json"), &json(&config))?;
    let motley = serde_json::json!({
        "exported_from": ckpt,
        "step": meta.step,
        "vocab": vocab,
        "note": "ids are motley's global ids: [text][specials][image codes][speech units] (docs/FORMAT.md §6.1)",
    });
    checkpoint::write_atomic(&out.join("motley.json"), &json(&motley))?;
    let n = renamed.len();
    let path = out.join("model.safetensors");
    Tensor::write_safetensors(&renamed, &path)
        .map_err(|e| TrainError::Checkpoint { path: path.clone(), msg: e.to_string() })?;
    Ok(ExportReport {
        checkpoint: ckpt,
        step: meta.step,
        out: out.to_path_buf(),
        architecture: architecture.into(),
        tensors: n,
        parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_names_map_to_llama_names_and_others_do_not() {
        let f = |n: &str| hf_name(n);
        assert_eq!(f("layers.3.attn.q_proj.weight").as_deref(), Some("model.layers.3.self_attn.q_proj.weight"));
        assert_eq!(f("layers.0.attn.k_norm.weight").as_deref(), Some("model.layers.0.self_attn.k_norm.weight"));
        assert_eq!(f("layers.1.ffn.down_proj.weight").as_deref(), Some("model.layers.1.mlp.down_proj.weight"));
        assert_eq!(f("layers.1.ffn_norm.weight").as_deref(), Some("model.layers.1.post_attention_layernorm.weight"));
        assert_eq!(f("embed.weight").as_deref(), Some("model.embed_tokens.weight"));
        for other in [
            "layers.0.attn.q_proj.text.weight",
            "layers.0.ffn.router.weight",
            "latent_in.weight",
            "layers.x.attn_norm.weight",
        ] {
            assert_eq!(f(other), None, "{other}");
        }
    }
}
