//! TGI's JSON request and response shapes for `/generate`, `/generate_stream` and `/info`.
//! Field names, defaults and omission rules follow TGI so its clients parse our output.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct GenerateParameters {
    #[serde(default)]
    pub best_of: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Beyond TGI: OpenAI's presence penalty, in [-2, 2].
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub typical_p: Option<f32>,
    #[serde(default)]
    pub do_sample: bool,
    #[serde(default)]
    pub max_new_tokens: Option<u32>,
    #[serde(default)]
    pub return_full_text: Option<bool>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub truncate: Option<usize>,
    #[serde(default)]
    pub watermark: bool,
    #[serde(default)]
    pub details: bool,
    #[serde(default)]
    pub decoder_input_details: bool,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub top_n_tokens: Option<u32>,
    /// Structured output: `{"type": "json" | "json_object" | "json_schema" | "regex", "value": ...}`
    /// (a JSON schema, or a regex the whole output matches).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub grammar: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub adapter_id: Option<String>,
    /// Beyond TGI: scheduling priority. Higher is served first; equal priorities are FIFO.
    #[serde(default)]
    pub priority: Option<i32>,
    /// Beyond TGI (as vLLM): keep generating past the EOS token, up to `max_new_tokens`.
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct GenerateRequest {
    pub inputs: String,
    /// Omitted parameters mean the defaults, greedy included (TGI samples when the whole object
    /// is missing but not when it is `{}`; see docs/compatibility.md).
    #[serde(default, deserialize_with = "super::json::object")]
    pub parameters: GenerateParameters,
}

/// `POST /`: a generate request that may ask for streaming.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompatGenerateRequest {
    pub inputs: String,
    #[serde(default, deserialize_with = "super::json::object")]
    pub parameters: GenerateParameters,
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Token {
    pub id: u32,
    pub text: String,
    /// Null when not finite (a token the processed distribution gave no mass, e.g. under an
    /// extreme temperature).
    #[serde(serialize_with = "nan_as_null")]
    #[schema(nullable)]
    pub logprob: f32,
    pub special: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    /// NaN (the first prompt token) is serialised as null.
    #[serde(serialize_with = "nan_as_null")]
    #[schema(nullable)]
    pub logprob: f32,
}

/// Non-finite logprobs as null (what serde_json writes for them anyway, stated in the schema).
pub(crate) fn nan_as_null<S: serde::Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    if !v.is_finite() {
        s.serialize_none()
    } else {
        s.serialize_f32(*v)
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

impl FinishReason {
    /// TGI's spelling, as in `details.finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
        }
    }

    /// The OpenAI spelling: `stop` for both EOS and a stop sequence (see docs/compatibility.md).
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken | FinishReason::StopSequence => "stop",
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of_sequences: Option<Vec<BestOfSequence>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
}

/// A `best_of` candidate that lost to the returned one.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BestOfSequence {
    pub generated_text: String,
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
}

/// One event of `/generate_stream`: a token, or (status still 200, as in TGI) an error.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StreamEvent {
    Token(StreamResponse),
    Error(crate::error::ErrorResponse),
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamResponse {
    pub index: u32,
    pub token: Token,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Token>,
    pub generated_text: Option<String>,
    pub details: Option<StreamDetails>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Info {
    pub model_id: String,
    pub model_sha: Option<String>,
    pub model_pipeline_tag: Option<String>,
    pub max_concurrent_requests: usize,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
    /// Beyond TGI: what the shards run and the batch budgets settled at warmup.
    pub dtype: String,
    pub device_type: String,
    pub max_batch_prefill_tokens: u32,
    pub max_batch_total_tokens: u32,
    pub validation_workers: usize,
    pub max_client_batch_size: usize,
    pub router: &'static str,
    pub version: &'static str,
    pub sha: Option<&'static str>,
    pub docker_label: Option<&'static str>,
}
