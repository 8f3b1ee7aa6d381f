//! The files the router reads from the model folder: the tokenizer, the tokenizer config (BOS,
//! EOS and the chat template) and `chat_template.json` / `chat_template.jinja` when present.
//! Template priority follows TGI: chat_template.json, then tokenizer_config.json.

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

pub struct ModelFiles {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The model's context length from config.json, when stated.
    pub max_position_embeddings: Option<usize>,
}

fn read_json(path: &Path) -> anyhow::Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)?;
    let value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Some(value))
}

/// A special token that may be written as a string or as `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    let v = v?;
    v.as_str()
        .or_else(|| v.get("content")?.as_str())
        .map(str::to_string)
}

/// A template that may be a string or a list of `{name, template}` (the `default` one wins).
fn template_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

impl ModelFiles {
    pub fn load(dir: &Path, tokenizer_config_path: Option<&Path>) -> anyhow::Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tok_path.display()))?;
        let config_path = tokenizer_config_path
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join("tokenizer_config.json"));
        let config = read_json(&config_path)?.unwrap_or(Value::Null);
        let mut chat_template = template_text(config.get("chat_template"));
        if let Ok(jinja) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
            chat_template = Some(jinja);
        }
        if let Some(json) = read_json(&dir.join("chat_template.json"))? {
            chat_template = template_text(json.get("chat_template")).or(chat_template);
        }
        let model_config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let max_position_embeddings = ["max_position_embeddings", "n_positions", "max_seq_len"]
            .iter()
            .find_map(|k| model_config.get(*k)?.as_u64())
            .map(|v| v as usize);
        Ok(Self {
            max_position_embeddings,
            tokenizer,
            chat_template,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
        })
    }
}
