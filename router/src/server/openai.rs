//! The OpenAI-compatible chat route, `POST /v1/chat/completions` (plain and streaming), and
//! `GET /v1/models`. Requests are rendered through the model's chat template and then run as
//! ordinary generations.

use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::join_all;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::generate::timing_headers;
use super::json::JsonBody;
use super::openai_types::*;
use super::sse::event;
use super::tools::{tool_grammar, ToolMode, ToolStream};
use super::types::{GenerateParameters, Token};
use super::SharedState;
use crate::chat_template::{ChatTemplate, TemplateInputs};
use crate::error::{ErrorResponse, InferError, ValidationError};
use crate::grammar::{from_response_format, Spec};
use crate::infer::InferEvent;
use serde_json::json;
use tracing::Instrument;

pub(crate) fn unsupported(what: &str) -> InferError {
    ValidationError::Other(format!("{what} is not supported yet")).into()
}

/// Messages as the template sees them: multi-part content flattened to text (images are
/// refused: no vision model is served yet), tool calls and tool answers kept.
fn template_messages(messages: Vec<Message>) -> Result<Vec<serde_json::Value>, InferError> {
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
                            ContentPart::ImageUrl { .. } => {
                                return Err(unsupported("image content"))
                            }
                        }
                    }
                    text
                }
            };
            let mut msg = serde_json::json!({"role": m.role, "content": content});
            if let Some(calls) = m.tool_calls {
                msg["tool_calls"] = calls.into();
            }
            if let Some(id) = m.tool_call_id {
                msg["tool_call_id"] = id.into();
            }
            if let Some(name) = m.name {
                msg["name"] = name.into();
            }
            Ok(msg)
        })
        .collect()
}

/// The rendered prompt of a chat request, with the model's template if it has one.
pub fn render(
    template: Option<&ChatTemplate>,
    req: &mut ChatRequest,
) -> Result<String, InferError> {
    if req.messages.is_empty() {
        return Err(ValidationError::Other("`messages` cannot be empty".into()).into());
    }
    let template = template
        .ok_or_else(|| InferError::TemplateError("this model has no chat template".into()))?;
    let messages = template_messages(std::mem::take(&mut req.messages))?;
    let inputs = TemplateInputs {
        tools: req.active_tools(),
        tool_prompt: req.tool_prompt.as_deref(),
        kwargs: req.chat_template_kwargs.as_ref(),
    };
    template.apply(&messages, &inputs)
}

/// The rendered prompt and the generation parameters of a chat request (TGI's mapping), the
/// grammar its tools or `response_format` ask for, and how to read tool calls out of the output.
pub fn prepare(
    template: Option<&ChatTemplate>,
    mut req: ChatRequest,
) -> Result<(String, GenerateParameters, Option<Spec>, Option<ToolMode>), InferError> {
    if req.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported("`logit_bias`"));
    }
    // `tool_choice: "none"` leaves the tools out altogether, as in TGI.
    let (grammar, tool_mode) = match tool_grammar(&req)? {
        Some((spec, mode)) => (Some(spec), Some(mode)),
        None => {
            let format = req.response_format.as_ref().map(from_response_format);
            (format.transpose()?.flatten(), None)
        }
    };
    let prompt = render(template, &mut req)?;
    let (do_sample, temperature) = sampling(req.temperature);
    let top_n_tokens = if req.logprobs.unwrap_or(false) {
        req.top_logprobs.or(Some(0))
    } else {
        None
    };
    let stop = Stop::into_vec(req.stop);
    Ok((
        prompt,
        GenerateParameters {
            do_sample,
            temperature,
            top_p: req.top_p,
            frequency_penalty: req.frequency_penalty,
            presence_penalty: req.presence_penalty,
            max_new_tokens: req.max_tokens,
            stop,
            seed: req.seed,
            top_n_tokens,
            details: true,
            priority: req.priority,
            ..Default::default()
        },
        grammar,
        tool_mode,
    ))
}

/// OpenAI's temperature as TGI maps it: 0 means greedy, anything else (or nothing) samples.
pub(crate) fn sampling(temperature: Option<f32>) -> (bool, Option<f32>) {
    match temperature {
        Some(t) if t == 0.0 => (false, None),
        other => (true, other),
    }
}

fn logprob_entry(token: &Token, top: &[Token]) -> ChatLogprob {
    let top_logprobs = top
        .iter()
        .map(|t| TopLogprob {
            token: t.text.clone(),
            logprob: t.logprob,
        })
        .collect();
    ChatLogprob {
        token: token.text.clone(),
        logprob: token.logprob,
        top_logprobs,
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How many choices a request asks for (OpenAI's `n`), checked.
pub(crate) fn choices(n: Option<u32>) -> Result<u32, InferError> {
    match n.unwrap_or(1) {
        0 => Err(ValidationError::Other("`n` must be strictly positive".into()).into()),
        n => Ok(n),
    }
}

fn logprobs_of(tokens: &[Token], top: &[Vec<Token>]) -> ChatLogprobs {
    let content = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| logprob_entry(t, top.get(i).map(Vec::as_slice).unwrap_or(&[])))
        .collect();
    ChatLogprobs { content }
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

/// An SSE event for a mid-stream failure (always reported as 422, as TGI does).
pub(crate) fn error_event(e: &InferError) -> Event {
    e.record();
    event(&StreamError {
        error: StreamErrorBody {
            message: e.to_string(),
            http_status_code: 422,
        },
    })
}

/// Chat completion (OpenAI API): the messages are rendered with the model's chat template.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "OpenAI", request_body = ChatRequest,
    responses(
        (status = 200, description = "The completion, or with `stream: true` an SSE stream of `ChatCompletionChunk`s ending with `data: [DONE]`",
            content((ChatCompletion = "application/json"), (ChatStreamEvent = "text/event-stream"))),
        (status = 422, description = "Invalid request or template error", body = ErrorResponse),
        (status = 424, description = "Generation failed", body = ErrorResponse),
        (status = 429, description = "Overloaded", body = ErrorResponse)))]
pub async fn chat_completions(
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, InferError> {
    let start = Instant::now();
    let n = choices(req.n)?;
    let permit = state.infer.admit_many(n)?;
    let model = req
        .model
        .clone()
        .filter(|m| m != "tgi")
        .unwrap_or_else(|| state.info.model_id.clone());
    let stream = req.stream;
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let logprobs = req.logprobs.unwrap_or(false);
    let (prompt, mut params, grammar, tool_mode) = prepare(state.chat_template.as_ref(), req)?;
    if let Some(spec) = grammar {
        // Converted once per distinct grammar (cached); validation then finds the regex cached.
        let regex = state.infer.validation.grammars.regex(spec).await?;
        params.grammar = json!({"type": "regex", "value": &*regex})
            .as_object()
            .cloned();
    }
    let chars = prompt.chars().count();
    let valid = state
        .infer
        .validation
        .validate(prompt, params, false)
        .await?;
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
            let headers = headers.get_or_insert_with(|| {
                timing_headers(&state.compute_type, chars, start, &r, input_length)
            });
            let g = &r.generated_text;
            completion_tokens += g.generated_tokens;
            headers.insert("x-generated-tokens", HeaderValue::from(completion_tokens));
            let call = tool_mode.and_then(|_| super::tools::parse_call(&g.text));
            let finish_reason = match (&call, g.finish_reason.openai()) {
                (Some(_), "stop") => "tool_calls",
                (_, reason) => reason,
            };
            let message = match call {
                Some(call) => OutputMessage {
                    role: "assistant",
                    content: None,
                    tool_calls: Some(vec![call]),
                },
                None => OutputMessage::text(g.text.clone()),
            };
            choices.push(ChatCompletionChoice {
                index,
                message,
                logprobs: logprobs.then(|| logprobs_of(&r.tokens, &r.top_tokens)),
                finish_reason,
            });
        }
        let body = ChatCompletion {
            object: "chat.completion",
            id,
            created: now(),
            model,
            system_fingerprint: fingerprint,
            choices,
            usage: usage(input_length, completion_tokens),
        };
        return Ok((headers.unwrap_or_default(), Json(body)).into_response());
    }
    let mut events = state.infer.schedule_all(requests);
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let created = now();
    tokio::spawn(
        async move {
            let _permit = permit;
            let chunk = |choices: Vec<ChunkChoice>, usage: Option<Usage>| {
                event(&ChatCompletionChunk {
                    object: "chat.completion.chunk",
                    id: id.clone(),
                    created,
                    model: model.clone(),
                    system_fingerprint: fingerprint.clone(),
                    choices,
                    usage,
                })
            };
            let mut completion_tokens = 0;
            let mut tool_streams: std::collections::HashMap<usize, ToolStream> = Default::default();
            while let Some((index, event)) = events.next().await {
                let (token, top, end) = match event {
                    Ok(InferEvent::Prefill(_)) => continue,
                    Ok(InferEvent::Token { token, top_tokens }) => (token, top_tokens, None),
                    Ok(InferEvent::End {
                        token,
                        top_tokens,
                        generated_text,
                        ..
                    }) => (token, top_tokens, Some(generated_text)),
                    Err(e) => {
                        let _ = tx.send(Ok(error_event(&e))).await;
                        break;
                    }
                };
                completion_tokens += end.as_ref().map_or(0, |g| g.generated_tokens);
                let text = if token.special {
                    String::new()
                } else {
                    token.text.clone()
                };
                let mut finish_reason = end.as_ref().map(|g| g.finish_reason.openai());
                let mut deltas = match tool_mode {
                    None => vec![Delta::text(text)],
                    Some(mode) => {
                        let stream = tool_streams
                            .entry(index)
                            .or_insert_with(|| ToolStream::new(mode));
                        let mut pieces = stream.push(&text);
                        if end.is_some() {
                            pieces.extend(stream.finish());
                            if stream.is_call() && finish_reason == Some("stop") {
                                finish_reason = Some("tool_calls");
                            }
                        }
                        pieces.into_iter().map(Delta::from).collect()
                    }
                };
                if deltas.is_empty() && (logprobs || finish_reason.is_some()) {
                    deltas.push(Delta::empty());
                }
                let last = deltas.len().saturating_sub(1);
                let mut token_logprobs = logprobs.then(|| ChatLogprobs {
                    content: vec![logprob_entry(&token, &top)],
                });
                for (i, delta) in deltas.into_iter().enumerate() {
                    let choice = ChunkChoice {
                        index,
                        delta,
                        logprobs: token_logprobs.take(),
                        finish_reason: if i == last { finish_reason } else { None },
                    };
                    if tx.send(Ok(chunk(vec![choice], None))).await.is_err() {
                        return;
                    }
                }
            }
            if include_usage {
                let _ = tx
                    .send(Ok(chunk(
                        Vec::new(),
                        Some(usage(input_length, completion_tokens)),
                    )))
                    .await;
            }
            let _ = tx.send(Ok(super::sse::done())).await;
        }
        .in_current_span(),
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-compute-type",
        HeaderValue::from_str(&state.compute_type).unwrap_or(HeaderValue::from_static("cpu")),
    );
    Ok(super::sse::response(headers, rx))
}

/// The served model (OpenAI API).
#[utoipa::path(get, path = "/v1/models", tag = "OpenAI", responses((status = 200, description = "The served model", body = ModelList)))]
pub async fn models(State(state): State<SharedState>) -> Json<ModelList> {
    let id = state.info.model_id.clone();
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: id.clone(),
            object: "model",
            created: 0,
            owned_by: id,
        }],
    })
}
