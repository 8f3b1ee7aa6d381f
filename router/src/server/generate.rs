//! TGI's generation routes: `POST /generate`, `POST /generate_stream` and `POST /` (which
//! dispatches on `stream`). Response bodies, SSE events and timing headers follow TGI.

use std::convert::Infallible;
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use futures::future::join_all;

use super::json::JsonBody;
use super::types::{
    BestOfSequence, CompatGenerateRequest, Details, GenerateParameters, GenerateRequest,
    GenerateResponse, StreamDetails, StreamEvent, StreamResponse,
};
use super::SharedState;
use crate::error::{ErrorResponse, InferError, ValidationError};
use crate::infer::{InferEvent, InferResponse};
use tracing::Instrument;

fn header(v: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&v.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// TGI's per-request timing headers for non-streaming responses.
pub fn timing_headers(
    compute_type: &str,
    chars: usize,
    start: Instant,
    r: &InferResponse,
    input_length: u32,
) -> HeaderMap {
    let total = start.elapsed();
    let validation = r.queued.saturating_duration_since(start);
    let queue = r.start.saturating_duration_since(r.queued);
    let inference = r.start.elapsed();
    let per_token = inference / r.generated_text.generated_tokens.max(1);
    let mut h = HeaderMap::new();
    h.insert("x-compute-type", header(compute_type));
    h.insert("x-compute-time", header(total.as_secs_f64()));
    h.insert("x-compute-characters", header(chars));
    h.insert("x-total-time", header(total.as_millis()));
    h.insert("x-validation-time", header(validation.as_millis()));
    h.insert("x-queue-time", header(queue.as_millis()));
    h.insert("x-inference-time", header(inference.as_millis()));
    h.insert("x-time-per-token", header(per_token.as_millis()));
    h.insert("x-prompt-tokens", header(input_length));
    h.insert(
        "x-generated-tokens",
        header(r.generated_text.generated_tokens),
    );
    h
}

/// Generate text (TGI API).
#[utoipa::path(post, path = "/generate", tag = "Text Generation Inference", request_body = GenerateRequest,
    responses(
        (status = 200, description = "Generated text", body = GenerateResponse),
        (status = 422, description = "Invalid request", body = ErrorResponse),
        (status = 424, description = "Generation failed", body = ErrorResponse),
        (status = 429, description = "Overloaded", body = ErrorResponse)))]
pub async fn generate(
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<GenerateRequest>,
) -> Result<Response, InferError> {
    generate_inner(state, req.inputs, req.parameters, false).await
}

/// Mean token logprob: TGI's criterion for the best of several candidates.
fn mean_logprob(r: &InferResponse) -> f32 {
    let n = r.tokens.len().max(1) as f32;
    r.tokens.iter().map(|t| t.logprob).sum::<f32>() / n
}

async fn generate_inner(
    state: SharedState,
    inputs: String,
    p: GenerateParameters,
    default_full_text: bool,
) -> Result<Response, InferError> {
    let start = Instant::now();
    let best_of = state.infer.validation.best_of(p.best_of)?;
    let _permit = state.infer.admit_many(best_of as u32)?;
    let chars = inputs.chars().count();
    let full_text = p.return_full_text.unwrap_or(default_full_text);
    let want_details = p.details || p.decoder_input_details;
    let valid = state
        .infer
        .validation
        .validate(inputs.clone(), p, true)
        .await?;
    let input_length = valid.input_length;
    // Candidates run concurrently, so they share prefills and decode steps.
    let mut results = join_all(
        valid
            .samples(best_of as u32)
            .into_iter()
            .map(|r| state.infer.generate(r)),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let best = (0..results.len())
        .max_by(|&a, &b| mean_logprob(&results[a]).total_cmp(&mean_logprob(&results[b])))
        .unwrap_or(0);
    let r = results.swap_remove(best);
    let text = |t: &str| {
        if full_text {
            format!("{inputs}{t}")
        } else {
            t.to_string()
        }
    };
    let best_of_sequences = (best_of > 1).then(|| {
        results
            .into_iter()
            .map(|o| BestOfSequence {
                generated_text: text(&o.generated_text.text),
                finish_reason: o.generated_text.finish_reason,
                generated_tokens: o.generated_text.generated_tokens,
                seed: o.generated_text.seed,
                prefill: o.prefill,
                tokens: o.tokens,
                top_tokens: o.top_tokens,
            })
            .collect()
    });
    let headers = timing_headers(&state.compute_type, chars, start, &r, input_length);
    let generated_text = text(&r.generated_text.text);
    let details = want_details.then(|| Details {
        finish_reason: r.generated_text.finish_reason,
        generated_tokens: r.generated_text.generated_tokens,
        seed: r.generated_text.seed,
        prefill: r.prefill,
        tokens: r.tokens,
        best_of_sequences,
        top_tokens: r.top_tokens,
    });
    Ok((
        headers,
        Json(GenerateResponse {
            generated_text,
            details,
        }),
    )
        .into_response())
}

/// Generate text, one SSE event per token (TGI API). Errors, validation included, arrive as
/// an `ErrorResponse` event with status 200, as in TGI.
#[utoipa::path(post, path = "/generate_stream", tag = "Text Generation Inference", request_body = GenerateRequest,
    responses(
        (status = 200, description = "SSE stream of `StreamResponse` events, or an `ErrorResponse` event", body = StreamEvent, content_type = "text/event-stream"),
        (status = 422, description = "A body that is not a valid request (answered before the stream starts)", body = ErrorResponse)))]
pub async fn generate_stream(
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<GenerateRequest>,
) -> Response {
    stream_inner(state, req.inputs, req.parameters, false).await
}

/// `POST /`: TGI's compatibility route. Without a pipeline tag (local models) TGI defaults
/// `return_full_text` to true here, and returns a JSON array when not streaming.
#[utoipa::path(post, path = "/", tag = "Text Generation Inference", request_body = CompatGenerateRequest,
    responses(
        (status = 200, description = "A one-element array of `GenerateResponse`, or an SSE stream with `stream: true`",
            content(([GenerateResponse] = "application/json"), (StreamEvent = "text/event-stream"))),
        (status = 422, description = "Invalid request", body = ErrorResponse),
        (status = 429, description = "Overloaded", body = ErrorResponse)))]
pub async fn compat_generate(
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<CompatGenerateRequest>,
) -> Response {
    if req.stream {
        return stream_inner(state, req.inputs, req.parameters, true).await;
    }
    match generate_inner(state, req.inputs, req.parameters, true).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let mut array = b"[".to_vec();
            array.extend_from_slice(&bytes);
            array.push(b']');
            Response::from_parts(parts, axum::body::Body::from(array))
        }
        Err(e) => e.into_response(),
    }
}

fn error_event(e: &InferError) -> Event {
    e.record();
    super::sse::event(&e.body())
}

async fn stream_inner(
    state: SharedState,
    inputs: String,
    p: GenerateParameters,
    default_full_text: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let mut headers = HeaderMap::new();
    headers.insert("x-compute-type", header(&state.compute_type));
    headers.insert("x-compute-characters", header(inputs.chars().count()));
    tokio::spawn(
        async move {
            // TGI reports every failure, validation included, as an SSE event with status 200.
            if let Err(e) = run_stream(&state, inputs, p, default_full_text, &tx).await {
                let _ = tx.send(Ok(error_event(&e))).await;
            }
        }
        .in_current_span(),
    );
    super::sse::response(headers, rx)
}

async fn run_stream(
    state: &SharedState,
    inputs: String,
    p: GenerateParameters,
    default_full_text: bool,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
) -> Result<(), InferError> {
    let _permit = state.infer.admit()?;
    if p.best_of.is_some_and(|b| b > 1) {
        return Err(ValidationError::BestOfStream.into());
    }
    if p.decoder_input_details {
        return Err(ValidationError::PrefillDetailsStream.into());
    }
    let full_text = p.return_full_text.unwrap_or(default_full_text);
    let details = p.details;
    let valid = state
        .infer
        .validation
        .validate(inputs.clone(), p, true)
        .await?;
    let input_length = valid.input_length;
    let mut stream = state.infer.schedule(valid);
    let mut index = 0u32;
    while let Some(event) = stream.next().await {
        let response = match event? {
            InferEvent::Prefill(_) => continue,
            InferEvent::Token { token, top_tokens } => {
                index += 1;
                StreamResponse {
                    index,
                    token,
                    top_tokens,
                    generated_text: None,
                    details: None,
                }
            }
            InferEvent::End {
                token,
                top_tokens,
                generated_text,
                ..
            } => {
                index += 1;
                let text = if full_text {
                    format!("{inputs}{}", generated_text.text)
                } else {
                    generated_text.text
                };
                let details = details.then_some(StreamDetails {
                    finish_reason: generated_text.finish_reason,
                    generated_tokens: generated_text.generated_tokens,
                    seed: generated_text.seed,
                    input_length,
                });
                StreamResponse {
                    index,
                    token,
                    top_tokens,
                    generated_text: Some(text),
                    details,
                }
            }
        };
        let done = response.generated_text.is_some();
        let event = super::sse::json_line(&response)
            .map(|line| Event::default().data(line))
            .map_err(|_| InferError::IncompleteGeneration)?;
        if tx.send(Ok(event)).await.is_err() {
            return Ok(()); // client disconnected; dropping the stream cancels the request
        }
        if done {
            return Ok(());
        }
    }
    Err(InferError::IncompleteGeneration)
}
