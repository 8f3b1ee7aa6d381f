//! `config.json` of a Hugging Face checkpoint, normalised into one shape for every architecture.
//!
//! Architectures spell the same facts differently (GPT-2's `n_embd` is everyone else's
//! `hidden_size`), and transformers versions move fields around (`rope_theta` vs
//! `rope_parameters`, `torch_dtype` vs `dtype`). This module accepts all of them, so the model
//! code sees one `ModelConfig` and never reads JSON itself.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Result, ShardError};

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: Option<usize>,
    #[serde(alias = "n_embd")]
    hidden_size: Option<usize>,
    #[serde(alias = "n_inner")]
    intermediate_size: Option<usize>,
    #[serde(alias = "n_layer")]
    num_hidden_layers: Option<usize>,
    #[serde(alias = "n_head")]
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    // Gemma 2 writes both `hidden_act` and `hidden_activation`; the latter is the one it uses.
    hidden_activation: Option<String>,
    activation_function: Option<String>,
    #[serde(alias = "n_positions")]
    max_position_embeddings: Option<usize>,
    #[serde(alias = "layer_norm_epsilon")]
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    partial_rotary_factor: Option<f64>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    eos_token_id: Option<Value>,
    bos_token_id: Option<Value>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
}

/// Which network the checkpoint holds. Llama-like covers every pre-norm RMSNorm + RoPE +
/// gated-MLP decoder; the others differ in structure, not just in options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama (incl. SmolLM2), Mistral, Qwen2/2.5, Qwen3 and Phi-3.
    Llama,
    Gemma2,
    Gpt2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// The tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Gelu,
}

/// RoPE context extension, as `rope_scaling` describes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Dynamic {
        factor: f64,
        original_max_position_embeddings: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The architecture facts of a model, whatever its family.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    /// RMSNorm (or GPT-2's LayerNorm) epsilon.
    pub norm_eps: f64,
    pub activation: Activation,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Head dimensions that rotate (`partial_rotary_factor * head_dim`).
    pub rotary_dim: usize,
    /// q/k/v projections carry a bias (Qwen2, or `attention_bias: true`).
    pub qkv_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    pub tie_word_embeddings: bool,
    /// Attention scores are multiplied by this (1/sqrt(head_dim) unless the model says otherwise).
    pub attention_scale: f64,
    /// `tanh(x / c) * c` on attention scores and on final logits (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// The dtype the checkpoint was saved in (`float32`, `bfloat16`, ...), if stated.
    pub torch_dtype: Option<String>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Per layer: the sliding-window span, `None` for full attention.
    pub layer_windows: Vec<Option<usize>>,
}

/// Token ids from a JSON value that may be a number, a list of numbers, or null.
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

pub const SUPPORTED: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2",
];

fn activation(name: &str) -> Result<Activation> {
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::Gelu),
        other => Err(ShardError::Unsupported(format!("activation `{other}`"))),
    }
}

fn rope_scaling(raw: &RawConfig, max_positions: usize) -> Result<RopeScaling> {
    let Some(s) = raw.rope_scaling.as_ref().or(raw.rope_parameters.as_ref()) else {
        return Ok(RopeScaling::None);
    };
    let num = |k: &str| s.get(k).and_then(Value::as_f64);
    let factor = num("factor").unwrap_or(1.0);
    let original = num("original_max_position_embeddings").unwrap_or(max_positions as f64);
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor },
        "dynamic" => RopeScaling::Dynamic {
            factor,
            original_max_position_embeddings: original,
        },
        "llama3" => RopeScaling::Llama3 {
            factor,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: original,
        },
        other => {
            return Err(ShardError::Unsupported(format!(
                "rope scaling `{other}` (supported: default, linear, dynamic, llama3)"
            )))
        }
    })
}

/// Which layers slide, from `layer_types` when the config lists them, else each family's rule.
fn layer_windows(raw: &RawConfig, model_type: &str, layers: usize) -> Vec<Option<usize>> {
    let window = raw.sliding_window;
    if let (Some(types), Some(_)) = (&raw.layer_types, window) {
        return types
            .iter()
            .map(|t| (t == "sliding_attention").then_some(window).flatten())
            .collect();
    }
    (0..layers)
        .map(|i| match model_type {
            "mistral" | "phi3" => window,
            "qwen2" | "qwen3" if raw.use_sliding_window == Some(true) => {
                window.filter(|_| i >= raw.max_window_layers.unwrap_or(0))
            }
            "gemma2" => window.filter(|_| i % 2 == 0),
            _ => None,
        })
        .collect()
}

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ShardError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::from_json(&text)?;
        config.apply_rope_override(
            std::env::var("ROPE_SCALING").ok().as_deref(),
            std::env::var("ROPE_FACTOR").ok().as_deref(),
        )?;
        Ok(config)
    }

    /// The launcher's `--rope-scaling`/`--rope-factor` (env ROPE_SCALING/ROPE_FACTOR), which
    /// replace whatever scaling config.json states, as in TGI.
    pub fn apply_rope_override(&mut self, kind: Option<&str>, factor: Option<&str>) -> Result<()> {
        let Some(kind) = kind else { return Ok(()) };
        let factor: f64 = match factor {
            Some(f) => f
                .parse()
                .map_err(|_| ShardError::Config(format!("ROPE_FACTOR `{f}` is not a number")))?,
            None => 1.0,
        };
        self.rope_scaling = match kind {
            "linear" => RopeScaling::Linear { factor },
            "dynamic" => RopeScaling::Dynamic {
                factor,
                original_max_position_embeddings: self.max_position_embeddings as f64,
            },
            other => {
                return Err(ShardError::Config(format!(
                    "ROPE_SCALING `{other}` (use linear or dynamic)"
                )))
            }
        };
        if let RopeScaling::Dynamic { .. } = self.rope_scaling {
            // Dynamic scaling exists to go past the trained length.
            self.max_position_embeddings = (self.max_position_embeddings as f64 * factor) as usize;
        }
        Ok(())
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
        let arch = match model_type.as_str() {
            "gemma2" => Arch::Gemma2,
            "gpt2" => Arch::Gpt2,
            _ => Arch::Llama,
        };
        let default_act = match arch {
            Arch::Llama => "silu",
            Arch::Gemma2 => "gelu_pytorch_tanh",
            Arch::Gpt2 => "gelu_new",
        };
        let activation = activation(
            raw.hidden_activation
                .as_deref()
                .or(raw.activation_function.as_deref())
                .or(raw.hidden_act.as_deref())
                .unwrap_or(default_act),
        )?;
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
        let trained_positions = raw.max_position_embeddings.unwrap_or(2048);
        let rope_scaling = rope_scaling(&raw, trained_positions)?;
        // Dynamic scaling exists to go past the trained length.
        let max_position_embeddings = match rope_scaling {
            RopeScaling::Dynamic { factor, .. } if factor > 1.0 => {
                (trained_positions as f64 * factor) as usize
            }
            _ => trained_positions,
        };
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let intermediate_size = match arch {
            Arch::Gpt2 => raw.intermediate_size.unwrap_or(4 * hidden_size),
            _ => need(raw.intermediate_size, "intermediate_size")?,
        };
        let rotary_dim = (raw.partial_rotary_factor.unwrap_or(1.0) * head_dim as f64) as usize;
        let scale_base = raw.query_pre_attn_scalar.unwrap_or(head_dim as f64);
        Ok(Self {
            arch,
            activation,
            rope_scaling,
            rotary_dim,
            layer_windows: layer_windows(&raw, &model_type, num_layers),
            qkv_bias: raw
                .attention_bias
                .unwrap_or(model_type == "qwen2" || arch == Arch::Gpt2),
            mlp_bias: raw.mlp_bias.unwrap_or(arch == Arch::Gpt2),
            qk_norm: model_type == "qwen3",
            tie_word_embeddings: raw
                .tie_word_embeddings
                .unwrap_or(matches!(arch, Arch::Gemma2 | Arch::Gpt2)),
            attention_scale: 1.0 / scale_base.sqrt(),
            attn_logit_softcapping: raw.attn_logit_softcapping,
            final_logit_softcapping: raw.final_logit_softcapping,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            intermediate_size,
            num_layers,
            max_position_embeddings,
            norm_eps: raw.rms_norm_eps.unwrap_or(match arch {
                Arch::Gpt2 => 1e-5,
                _ => 1e-6,
            }),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            model_type,
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
        })
    }

    /// `(hidden, heads, kv_heads, head_dim, intermediate)` as tensor dimensions.
    pub fn dims(&self) -> (i64, i64, i64, i64, i64) {
        (
            self.hidden_size as i64,
            self.num_heads as i64,
            self.num_kv_heads as i64,
            self.head_dim as i64,
            self.intermediate_size as i64,
        )
    }

    /// The widest sliding window of any layer (what `Info.window_size` reports), if every layer slides.
    pub fn sliding_window(&self) -> Option<usize> {
        if self.layer_windows.iter().all(Option::is_some) {
            self.layer_windows.iter().flatten().max().copied()
        } else {
            None
        }
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

#[cfg(test)]
mod rope_tests {
    use super::*;

    const LLAMA: &str = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":100}"#;

    #[test]
    fn launcher_rope_override_follows_tgi() {
        let mut c = ModelConfig::from_json(LLAMA).unwrap();
        c.apply_rope_override(Some("linear"), Some("2.0")).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let mut c = ModelConfig::from_json(LLAMA).unwrap();
        c.apply_rope_override(Some("dynamic"), Some("4")).unwrap();
        assert!(matches!(c.rope_scaling, RopeScaling::Dynamic { factor, .. } if factor == 4.0));
        assert_eq!(
            c.max_position_embeddings, 400,
            "dynamic scaling extends the context"
        );
        let mut c = ModelConfig::from_json(LLAMA).unwrap();
        assert!(c.apply_rope_override(Some("yarn"), None).is_err());
        assert!(c.apply_rope_override(Some("linear"), Some("x")).is_err());
    }

    #[test]
    fn config_rope_scaling_kinds() {
        let with = |s: &str| {
            ModelConfig::from_json(&LLAMA.replace('}', &format!(r#","rope_scaling":{s}}}"#)))
        };
        let c = with(r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}"#).unwrap();
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let c = with(r#"{"type":"dynamic","factor":2.0}"#).unwrap();
        assert_eq!(c.max_position_embeddings, 200);
        let e = with(r#"{"rope_type":"yarn","factor":2.0}"#).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
    }
}
