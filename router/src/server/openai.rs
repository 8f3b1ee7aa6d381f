//! The OpenAI-compatible chat route, `POST /v1/chat/completions` (plain and streaming), and
//! `GET /v1/models`. Requests are rendered through the model's chat template and then run as
//! ordinary generations.

use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use futures::future::join_all;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::generate::timing_headers;
use super::types::{GenerateParameters, Token};
use super::json::JsonBody;
use super::SharedState;
use crate::chat_template::TemplateMessage;
use crate::error::{InferError, ValidationError};
use crate::infer::InferEvent;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: Value },
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
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
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(default)]
    pub response_format: Option<Value>,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

pub(crate) fn unsupported(what: &str) -> InferError {
    ValidationError::Other(format!("{what} is not supported yet")).into()
}

/// Flattens multi-part content to text. Images are refused: no vision model is served yet.
fn template_messages(messages: Vec<Message>) -> Result<Vec<TemplateMessage>, InferError> {
    messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match part {
                            ContentPart::Text { text: t } => text.push_str(&t),
                            ContentPart::ImageUrl { .. } => return Err(unsupported("image content")),
                        }
                    }
                    text
                }
            };
            Ok(TemplateMessage { role: m.role, content })
        })
        .collect()
}

/// The rendered prompt and the generation parameters of a chat request (TGI's mapping).
pub(crate) fn prepare(state: &SharedState, req: ChatRequest) -> Result<(String, GenerateParameters), InferError> {
    if req.presence_penalty.is_some_and(|p| p != 0.0) {
        return Err(unsupported("`presence_penalty`"));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(unsupported("`tools`"));
    }
    if req.response_format.as_ref().is_some_and(|f| !f.is_null() && f.get("type") != Some(&json!("text"))) {
        return Err(unsupported("`response_format`"));
    }
    if req.messages.is_empty() {
        return Err(ValidationError::Other("`messages` cannot be empty".into()).into());
    }
    let template = state
        .chat_template
        .as_ref()
        .ok_or_else(|| InferError::TemplateError("this model has no chat template".into()))?;
    let prompt = template.apply(&template_messages(req.messages)?)?;
    let (do_sample, temperature) = sampling(req.temperature);
    let top_n_tokens = if req.logprobs.unwrap_or(false) { req.top_logprobs.or(Some(0)) } else { None };
    let stop = Stop::into_vec(req.stop);
    Ok((
        prompt,
        GenerateParameters {
            do_sample,
            temperature,
            top_p: req.top_p,
            frequency_penalty: req.frequency_penalty,
            max_new_tokens: req.max_tokens,
            stop,
            seed: req.seed,
            top_n_tokens,
            details: true,
            ..Default::default()
        },
    ))
}

/// OpenAI's temperature as TGI maps it: 0 means greedy, anything else (or nothing) samples.
pub(crate) fn sampling(temperature: Option<f32>) -> (bool, Option<f32>) {
    match temperature {
        Some(t) if t == 0.0 => (false, None),
        other => (true, other),
    }
}

fn logprob_entry(token: &Token, top: &[Token]) -> Value {
    let tops: Vec<Value> = top.iter().map(|t| json!({"token": t.text, "logprob": t.logprob})).collect();
    json!({"token": token.text, "logprob": token.logprob, "top_logprobs": tops})
}

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// How many choices a request asks for (OpenAI's `n`), checked.
pub(crate) fn choices(n: Option<u32>) -> Result<u32, InferError> {
    match n.unwrap_or(1) {
        0 => Err(ValidationError::Other("`n` must be strictly positive".into()).into()),
        n => Ok(n),
    }
}

fn logprobs_of(tokens: &[Token], top: &[Vec<Token>]) -> Value {
    let content: Vec<Value> =
        tokens.iter().enumerate().map(|(i, t)| logprob_entry(t, top.get(i).map(Vec::as_slice).unwrap_or(&[]))).collect();
    json!({ "content": content })
}

pub async fn chat_completions(State(state): State<SharedState>, JsonBody(req): JsonBody<ChatRequest>) -> Result<Response, InferError> {
    let start = Instant::now();
    let n = choices(req.n)?;
    let permit = state.infer.admit_many(n)?;
    let model = req.model.clone().filter(|m| m != "tgi").unwrap_or_else(|| state.info.model_id.clone());
    let stream = req.stream;
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let logprobs = req.logprobs.unwrap_or(false);
    let (prompt, params) = prepare(&state, req)?;
    let chars = prompt.chars().count();
    let valid = state.infer.validation.validate(prompt, params, false).await?;
    let input_length = valid.input_length;
    let requests = valid.samples(n);
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let fingerprint = state.system_fingerprint();
    if !stream {
        let results = join_all(requests.into_iter().map(|r| state.infer.generate(r))).await;
        let mut headers = None;
        let mut choices = Vec::with_capacity(results.len());
        let mut completion_tokens = 0;
        for (index, r) in results.into_iter().enumerate() {
            let r = r?;
            let headers = headers.get_or_insert_with(|| timing_headers(&state.compute_type, chars, start, &r, input_length));
            let g = &r.generated_text;
            completion_tokens += g.generated_tokens;
            headers.insert("x-generated-tokens", HeaderValue::from(completion_tokens));
            choices.push(json!({
                "index": index,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": if logprobs { logprobs_of(&r.tokens, &r.top_tokens) } else { Value::Null },
                "finish_reason": g.finish_reason.openai(),
            }));
        }
        let body = json!({
            "object": "chat.completion",
            "id": id,
            "created": now(),
            "model": model,
            "system_fingerprint": fingerprint,
            "choices": choices,
            "usage": Usage { prompt_tokens: input_length, completion_tokens, total_tokens: input_length + completion_tokens },
        });
        return Ok((headers.unwrap_or_default(), Json(body)).into_response());
    }
    let mut events = state.infer.schedule_all(requests);
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let created = now();
    tokio::spawn(async move {
        let _permit = permit;
        let chunk = |choices: Value, usage: Value| {
            let body = json!({
                "object": "chat.completion.chunk", "id": id, "created": created, "model": model,
                "system_fingerprint": fingerprint, "choices": choices, "usage": usage,
            });
            Event::default().data(body.to_string())
        };
        let mut completion_tokens = 0;
        while let Some((index, event)) = events.next().await {
            let (token, top, end) = match event {
                Ok(InferEvent::Prefill(_)) => continue,
                Ok(InferEvent::Token { token, top_tokens }) => (token, top_tokens, None),
                Ok(InferEvent::End { token, top_tokens, generated_text, .. }) => (token, top_tokens, Some(generated_text)),
                Err(e) => {
                    let body = json!({"error": {"message": e.to_string(), "http_status_code": 422}});
                    let _ = tx.send(Ok(Event::default().data(body.to_string()))).await;
                    break;
                }
            };
            let content = if token.special { String::new() } else { token.text.clone() };
            let lp = if logprobs { json!({"content": [logprob_entry(&token, &top)]}) } else { Value::Null };
            let finish = end.as_ref().map(|g| json!(g.finish_reason.openai())).unwrap_or(Value::Null);
            completion_tokens += end.as_ref().map_or(0, |g| g.generated_tokens);
            let choice = json!([{"index": index, "delta": {"role": "assistant", "content": content}, "logprobs": lp, "finish_reason": finish}]);
            if tx.send(Ok(chunk(choice, Value::Null))).await.is_err() {
                return;
            }
        }
        if include_usage {
            let usage = json!(Usage { prompt_tokens: input_length, completion_tokens, total_tokens: input_length + completion_tokens });
            let _ = tx.send(Ok(chunk(json!([]), usage))).await;
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    let mut headers = HeaderMap::new();
    headers.insert("x-compute-type", HeaderValue::from_str(&state.compute_type).unwrap_or(HeaderValue::from_static("cpu")));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok((headers, Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())).into_response())
}

pub async fn models(State(state): State<SharedState>) -> Json<Value> {
    let id = &state.info.model_id;
    Json(json!({"object": "list", "data": [{"id": id, "object": "model", "created": 0, "owned_by": id}]}))
}
