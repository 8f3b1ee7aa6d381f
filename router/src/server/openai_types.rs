//! The OpenAI API's JSON shapes: chat and completions requests, their responses and stream
//! chunks, and the model list. Typed (rather than built as loose JSON) so that the OpenAPI
//! document describes exactly what the handlers send.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    try_from = "serde_json::Map<String, Value>"
)]
pub enum ContentPart {
    Text {
        text: String,
    },
    ImageUrl {
        #[schema(value_type = Object)]
        image_url: Value,
    },
}

/// A content part is read from its JSON object by hand: serde's tagged enum would take a number
/// as the tag (`"type": 0` meaning the first variant), and its structs an array for an object.
impl TryFrom<serde_json::Map<String, Value>> for ContentPart {
    type Error = String;

    fn try_from(mut p: serde_json::Map<String, Value>) -> Result<Self, String> {
        let kind = match p.get("type") {
            Some(Value::String(k)) => k.clone(),
            _ => return Err("a content part needs a string `type`".into()),
        };
        let text = match p.remove("text") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t),
            Some(_) => return Err("`text` must be a string".into()),
        };
        let image_url = p.remove("image_url").filter(|v| !v.is_null());
        match (kind.as_str(), text, image_url) {
            ("text", Some(text), _) => Ok(ContentPart::Text { text }),
            ("image_url", _, Some(image_url)) => Ok(ContentPart::ImageUrl { image_url }),
            ("text", None, _) => Err("a `text` part needs `text`".into()),
            ("image_url", _, None) => Err("an `image_url` part needs `image_url`".into()),
            (other, _, _) => Err(format!(
                "unknown content part type `{other}`: expected text or image_url"
            )),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant's earlier tool calls (`[{id?, type: "function", function: {name, arguments}}]`).
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tool_calls: Option<Vec<serde_json::Map<String, Value>>>,
    /// For `role: tool`: the call this message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(stop: Option<Stop>) -> Vec<String> {
        match stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(deserialize_with = "super::json::objects")]
    pub messages: Vec<Message>,
    /// Scheduling priority (as vLLM): higher is served first.
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Token id → bias. Not supported yet: a non-empty map is refused rather than ignored.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default, alias = "max_completion_tokens")]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, deserialize_with = "super::json::optional_object")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Functions the model may call: `[{"type": "function", "function": {"name", "description",
    /// "parameters"}}]`.
    #[serde(default, deserialize_with = "super::json::optional_objects")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    /// {"name", "schema", "strict"}}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// `auto` (the default with tools), `none`, `required` or `{"type": "function", ...}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// Instruction shown with the tools when the template cannot render them itself.
    #[serde(default)]
    pub tool_prompt: Option<String>,
    /// Extra variables for the chat template, e.g. `{"enable_thinking": false}` (as in vLLM).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

impl ChatRequest {
    /// Tools the template should see: none when absent, empty or `tool_choice: "none"`.
    pub fn active_tools(&self) -> Option<&Value> {
        let tools = self
            .tools
            .as_ref()
            .filter(|t| t.as_array().is_some_and(|a| !a.is_empty()))?;
        match &self.tool_choice {
            Some(Value::String(s)) if s == "none" => None,
            _ => Some(tools),
        }
    }
}

#[derive(Debug, Default, Clone, Copy, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub suffix: Option<String>,
    /// Scheduling priority (as vLLM): higher is served first.
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<u32>,
}

/// `{"type": "text"}` or nothing: the only `response_format`s honoured without a grammar.
pub fn is_plain_text_format(format: &Option<Value>) -> bool {
    format
        .as_ref()
        .is_none_or(|f| f.is_null() || f.get("type").and_then(Value::as_str) == Some("text"))
}

/// The assistant's message: text, or (with `content` null) the tools it calls.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutputMessage {
    pub role: &'static str,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

impl OutputMessage {
    pub fn text(content: String) -> Self {
        Self {
            role: "assistant",
            content: Some(content),
            tool_calls: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a string of JSON (OpenAI's convention).
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ToolCall {
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// A streamed piece of a tool call: the first carries its id and name, the rest argument text.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

/// What one stream event adds to the message.
#[derive(Debug, Serialize, ToSchema)]
pub struct Delta {
    pub role: &'static str,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

impl Delta {
    pub fn text(content: String) -> Self {
        Self {
            role: "assistant",
            content: Some(content),
            tool_calls: None,
        }
    }

    /// Nothing new (an event that only carries logprobs or the finish reason).
    pub fn empty() -> Self {
        Self {
            role: "assistant",
            content: None,
            tool_calls: None,
        }
    }
}

impl From<super::tools::Piece> for Delta {
    fn from(p: super::tools::Piece) -> Self {
        match p {
            super::tools::Piece::Content(text) => Delta::text(text),
            super::tools::Piece::Call(call) => Self {
                role: "assistant",
                content: None,
                tool_calls: Some(vec![call]),
            },
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    /// Null when not finite.
    #[serde(serialize_with = "super::types::nan_as_null")]
    #[schema(nullable)]
    pub logprob: f32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatLogprob {
    pub token: String,
    /// Null when not finite.
    #[serde(serialize_with = "super::types::nan_as_null")]
    #[schema(nullable)]
    pub logprob: f32,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatLogprob>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChoice {
    pub index: usize,
    pub message: OutputMessage,
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length`, or `tool_calls` when the message calls tools.
    pub finish_reason: &'static str,
}

/// `POST /v1/chat/completions` without streaming.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// Always `chat.completion`.
    pub object: &'static str,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatCompletionChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// One SSE event of a streamed chat completion. The optional last one has no choices and
/// carries `usage` (`stream_options.include_usage`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChunkChoice>,
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    /// Always null: completions logprobs are not offered (as in TGI).
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    /// `stop` or `length`; empty in a stream's intermediate events (as in TGI).
    pub finish_reason: &'static str,
}

/// `POST /v1/completions`, and each event of its stream (where `usage` comes with a prompt's
/// last token).
#[derive(Debug, Serialize, ToSchema)]
pub struct Completion {
    /// Always `text_completion`.
    pub object: &'static str,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// One event of a streamed chat completion (besides the final `[DONE]`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ChatStreamEvent {
    Chunk(ChatCompletionChunk),
    Error(StreamError),
}

/// One event of a streamed completion (besides the final `[DONE]`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum CompletionStreamEvent {
    Chunk(Completion),
    Error(StreamError),
}

/// A mid-stream failure on the OpenAI routes.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamError {
    pub error: StreamErrorBody,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StreamErrorBody {
    pub message: String,
    pub http_status_code: u16,
}
