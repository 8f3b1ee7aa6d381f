//! `POST /tokenize` and `POST /chat_tokenize`: what the model would see, token by token, with
//! byte offsets into the text, so clients can count tokens and debug templates.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::json::JsonBody;
use super::openai::render;
use super::openai_types::ChatRequest;
use super::types::GenerateRequest;
use super::SharedState;
use crate::error::{ErrorResponse, InferError, ValidationError};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub stop: usize,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatTokenizeResponse {
    pub tokenize_response: Vec<SimpleToken>,
    pub templated_text: String,
}

async fn simple_tokens(
    state: &SharedState,
    text: &str,
    add_special_tokens: bool,
) -> Result<Vec<SimpleToken>, InferError> {
    let enc = state
        .infer
        .validation
        .tokenize(text.to_string(), add_special_tokens)
        .await?;
    Ok(enc
        .get_ids()
        .iter()
        .zip(enc.get_offsets())
        .map(|(&id, &(start, stop))| SimpleToken {
            id,
            text: text.get(start..stop).unwrap_or_default().to_string(),
            start,
            stop,
        })
        .collect())
}

/// Tokenize a prompt as the model will see it (special tokens added).
#[utoipa::path(post, path = "/tokenize", tag = "Text Generation Inference", request_body = GenerateRequest,
    responses((status = 200, description = "Tokens with byte offsets", body = [SimpleToken]), (status = 422, description = "Invalid request", body = ErrorResponse)))]
pub async fn tokenize(
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<GenerateRequest>,
) -> Result<Json<Vec<SimpleToken>>, InferError> {
    if req.inputs.is_empty() {
        return Err(ValidationError::EmptyInput.into());
    }
    Ok(Json(simple_tokens(&state, &req.inputs, true).await?))
}

/// Render the chat template for a chat request and tokenize the result.
#[utoipa::path(post, path = "/chat_tokenize", tag = "Text Generation Inference", request_body = ChatRequest,
    responses((status = 200, description = "Templated text and its tokens", body = ChatTokenizeResponse), (status = 422, description = "Invalid request or template error", body = ErrorResponse)))]
pub async fn chat_tokenize(
    State(state): State<SharedState>,
    JsonBody(mut req): JsonBody<ChatRequest>,
) -> Result<Json<ChatTokenizeResponse>, InferError> {
    let templated_text = render(state.chat_template.as_ref(), &mut req)?;
    let tokenize_response = simple_tokens(&state, &templated_text, false).await?;
    Ok(Json(ChatTokenizeResponse {
        tokenize_response,
        templated_text,
    }))
}
