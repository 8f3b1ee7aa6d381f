//! `config.json` of a Hugging Face checkpoint, reduced to what the Llama-family runtime needs.
//!
//! Checkpoints written by different transformers versions spell some fields differently
//! (`rope_theta` vs `rope_parameters`, `torch_dtype` vs `dtype`); this module accepts all of them
//! so the model code sees one normalised shape.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Result, ShardError};

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    eos_token_id: Option<serde_json::Value>,
    bos_token_id: Option<serde_json::Value>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
}

/// The architecture facts of a Llama-family model (Llama, Mistral, Qwen2, SmolLM2).
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// q/k/v projections carry a bias (Qwen2, or `attention_bias: true`).
    pub qkv_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint was saved in (`float32`, `bfloat16`, ...), if stated.
    pub torch_dtype: Option<String>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Sliding-window attention span, only when the model really uses one.
    pub sliding_window: Option<usize>,
}

/// Token ids from a JSON value that may be a number, a list of numbers, or null.
pub fn token_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2"];

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ShardError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| ShardError::Config(e.to_string()))?;
        let model_type = raw
            .model_type
            .clone()
            .ok_or_else(|| ShardError::Config("missing `model_type`".into()))?;
        if !SUPPORTED.contains(&model_type.as_str()) {
            return Err(ShardError::Unsupported(format!(
                "model_type `{model_type}` (architectures {:?}); supported: {}",
                raw.architectures,
                SUPPORTED.join(", ")
            )));
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(ShardError::Unsupported(format!("hidden_act `{act}`")));
            }
        }
        let need = |v: Option<usize>, name: &str| {
            v.ok_or_else(|| ShardError::Config(format!("missing `{name}`")))
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(ShardError::Config(format!(
                "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(hidden_size / num_heads);
        let rope_theta = raw
            .rope_theta
            .or_else(|| raw.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10000.0);
        let scaling = raw.rope_scaling.as_ref().or(raw.rope_parameters.as_ref());
        if let Some(kind) = scaling
            .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
            .and_then(|t| t.as_str())
        {
            if kind != "default" {
                return Err(ShardError::Unsupported(format!("rope scaling `{kind}`")));
            }
        }
        let sliding_window = match model_type.as_str() {
            "mistral" => raw.sliding_window,
            "qwen2" if raw.use_sliding_window == Some(true) => raw.sliding_window,
            _ => None,
        };
        Ok(Self {
            qkv_bias: raw.attention_bias.unwrap_or(model_type == "qwen2"),
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            model_type,
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            sliding_window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_transformers5_spelling() {
        let c = ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":1,"num_attention_heads":2,"rope_parameters":{"rope_theta":500000.0,"rope_type":"default"},
                "dtype":"bfloat16","eos_token_id":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.num_kv_heads, 2);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.eos_token_ids, vec![1, 2]);
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_heads() {
        let e = ModelConfig::from_json(r#"{"model_type":"bloom"}"#).unwrap_err();
        assert!(e.to_string().contains("bloom"), "{e}");
        let e = ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":9,"intermediate_size":16,
                "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        assert!(ModelConfig::from_json("{not json").is_err());
    }
}
