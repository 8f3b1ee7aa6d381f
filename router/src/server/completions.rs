//! `POST /v1/completions` (OpenAI legacy completions): one or several prompts, each run as its
//! own generation, concurrently. Non-streaming returns every choice with summed usage;
//! streaming interleaves the prompts' tokens as TGI does and ends with `data: [DONE]`.

use std::convert::Infallible;
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::join_all;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::generate::timing_headers;
use super::json::JsonBody;
use super::openai::{choices, error_event, now, sampling};
use super::openai_types::{
    Completion, CompletionChoice, CompletionRequest, CompletionStreamEvent, Prompt, Stop, Usage,
};
use super::sse::event;
use super::types::GenerateParameters;
use super::SharedState;
use crate::error::{ErrorResponse, InferError};
use crate::infer::InferEvent;
use crate::validation::ValidRequest;
use tracing::Instrument;

fn error(status: StatusCode, error: &str, error_type: &str) -> Response {
    (
        status,
        Json(ErrorResponse {
            error: error.into(),
            error_type: error_type.into(),
        }),
    )
        .into_response()
}

/// Text completion (OpenAI API): one or several prompts, each with `n` samples.
#[utoipa::path(post, path = "/v1/completions", tag = "OpenAI", request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or with `stream: true` an SSE stream of `Completion` events ending with `data: [DONE]`",
            content((Completion = "application/json"), (CompletionStreamEvent = "text/event-stream"))),
        (status = 422, description = "Invalid request", body = ErrorResponse),
        (status = 424, description = "Generation failed", body = ErrorResponse),
        (status = 429, description = "Overloaded", body = ErrorResponse)))]
pub async fn completions(
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Response {
    match run(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(state: SharedState, req: CompletionRequest) -> Result<Response, InferError> {
    let start = Instant::now();
    if req.suffix.is_some() {
        return Ok(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
            "suffix not supported",
        ));
    }
    let n = choices(req.n)?;
    let prompts = match req.prompt {
        Prompt::One(p) => vec![p],
        Prompt::Many(v) => v,
    };
    if prompts.is_empty() {
        return Ok(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Empty array detected. Do not use an empty array for the prompt.",
            "validation",
        ));
    }
    let max = state.info.max_client_batch_size;
    if prompts.len() > max {
        return Ok(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("Number of prompts exceeds the maximum allowed batch size of {max}"),
            "batch size exceeded",
        ));
    }
    let (do_sample, temperature) = sampling(req.temperature);
    let params = GenerateParameters {
        do_sample,
        temperature,
        top_p: req.top_p,
        max_new_tokens: req.max_tokens,
        seed: req.seed,
        repetition_penalty: req.repetition_penalty,
        frequency_penalty: req.frequency_penalty,
        presence_penalty: req.presence_penalty,
        stop: Stop::into_vec(req.stop),
        details: true,
        priority: req.priority,
        ..Default::default()
    };
    // Every sequence takes its own concurrency slot, and every prompt is validated before any
    // of them runs. Choice `i * n + j` is sample `j` of prompt `i`, as in OpenAI's API.
    let permits = state.infer.admit_many(prompts.len() as u32 * n)?;
    let mut valid: Vec<ValidRequest> = Vec::with_capacity(prompts.len() * n as usize);
    let chars: usize = prompts.iter().map(|p| p.chars().count()).sum();
    for prompt in prompts {
        valid.extend(
            state
                .infer
                .validation
                .validate(prompt, params.clone(), true)
                .await?
                .samples(n),
        );
    }
    let model = state.info.model_id.clone();
    let fingerprint = state.system_fingerprint();
    let id = format!("cmpl-{:016x}", rand::random::<u64>());
    let created = now();
    let mut headers = HeaderMap::new();
    let h = |v: String| HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static(""));
    headers.insert("x-compute-type", h(state.compute_type.clone()));
    headers.insert("x-compute-characters", h(chars.to_string()));
    if req.stream {
        let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
        let lengths: Vec<u32> = valid.iter().map(|v| v.input_length).collect();
        let mut events = state.infer.schedule_all(valid);
        tokio::spawn(
            async move {
                let _permits = permits;
                let completion = |choice: CompletionChoice, usage: Option<Usage>| Completion {
                    object: "text_completion",
                    id: id.clone(),
                    created,
                    model: model.clone(),
                    system_fingerprint: fingerprint.clone(),
                    choices: vec![choice],
                    usage,
                };
                while let Some((index, item)) = events.next().await {
                    let (token, end) = match item {
                        Ok(InferEvent::Prefill(_)) => continue,
                        Ok(InferEvent::Token { token, .. }) => (token, None),
                        Ok(InferEvent::End {
                            token,
                            generated_text,
                            ..
                        }) => (token, Some(generated_text)),
                        Err(e) => {
                            let _ = tx.send(Ok(error_event(&e))).await;
                            break;
                        }
                    };
                    let usage = end.as_ref().map(|g| Usage {
                        prompt_tokens: lengths[index],
                        completion_tokens: g.generated_tokens,
                        total_tokens: lengths[index] + g.generated_tokens,
                    });
                    let choice = CompletionChoice {
                        index,
                        text: if token.special {
                            String::new()
                        } else {
                            token.text
                        },
                        logprobs: None,
                        finish_reason: end.as_ref().map_or("", |g| g.finish_reason.openai()),
                    };
                    if tx
                        .send(Ok(event(&completion(choice, usage))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = tx.send(Ok(super::sse::done())).await;
            }
            .in_current_span(),
        );
        return Ok(super::sse::response(headers, rx));
    }
    let lengths: Vec<u32> = valid.iter().map(|v| v.input_length).collect();
    let results = join_all(valid.into_iter().map(|r| state.infer.generate(r))).await;
    drop(permits);
    let mut usage = Usage::default();
    let mut choices = Vec::new();
    let mut timings = Vec::new();
    for (index, (result, input_length)) in results.into_iter().zip(lengths).enumerate() {
        let r = result?;
        timings.push(timing_headers(
            &state.compute_type,
            0,
            start,
            &r,
            input_length,
        ));
        let g = r.generated_text;
        // A prompt's tokens count once, however many samples were drawn from it.
        if index as u32 % n == 0 {
            usage.prompt_tokens += input_length;
        }
        usage.completion_tokens += g.generated_tokens;
        choices.push(CompletionChoice {
            index,
            text: g.text,
            logprobs: None,
            finish_reason: g.finish_reason.openai(),
        });
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    // As TGI: the per-prompt timing and token headers, summed over the prompts.
    for name in [
        "x-compute-time",
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
        "x-generated-tokens",
    ] {
        let sum: f64 = timings
            .iter()
            .filter_map(|t| t.get(name)?.to_str().ok()?.parse::<f64>().ok())
            .sum();
        headers.insert(name, h(sum.to_string()));
    }
    headers.insert("x-prompt-tokens", h(usage.prompt_tokens.to_string()));
    let body = Completion {
        object: "text_completion",
        id,
        created,
        model,
        system_fingerprint: fingerprint,
        choices,
        usage: Some(usage),
    };
    Ok((headers, Json(body)).into_response())
}
