//! Errors a request can meet on its way through the router, and how each maps to an HTTP
//! status and TGI's `{"error", "error_type"}` body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ValidationError {
    #[error("`best_of` != 1 is not allowed for this endpoint")]
    BestOfDisabled,
    #[error("you must use sampling when `best_of` is > 1")]
    BestOfSampling,
    #[error("`seed` must not be set when `best_of` > 1")]
    BestOfSeed,
    #[error("`best_of` must be > 0 and <= {0}. Given: {1}")]
    BestOf(usize, usize),
    #[error("`temperature` must be strictly positive")]
    Temperature,
    #[error("`repetition_penalty` must be strictly positive")]
    RepetitionPenalty,
    #[error("`frequency_penalty` must be >= -2.0 and <= 2.0")]
    FrequencyPenalty,
    #[error("`presence_penalty` must be >= -2.0 and <= 2.0")]
    PresencePenalty,
    #[error("`top_p` must be > 0.0 and <= 1.0")]
    TopP,
    #[error("`typical_p` must be > 0.0 and <= 1.0")]
    TypicalP,
    #[error("`top_k` must be strictly positive")]
    TopK,
    #[error("`max_new_tokens` must be strictly positive")]
    NegativeMaxNewTokens,
    #[error("`stop` supports up to {0} stop sequences. Given: {1}")]
    StopSequence(usize, usize),
    #[error("`top_n_tokens` must be >= 0 and <= {0}. Given: {1}")]
    TopNTokens(u32, u32),
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    #[error("`truncate` must be strictly positive and less than {0}. Given: {1}")]
    Truncate(usize, usize),
    #[error("tokenizer error {0}")]
    Tokenizer(String),
    #[error("`inputs` tokens + `max_new_tokens` must be <= {0}. Given: {1} `inputs` tokens and {2} `max_new_tokens`")]
    MaxTotalTokens(usize, usize, u32),
    #[error("`inputs` must have less than {0} tokens. Given: {1}")]
    InputLength(usize, usize),
    #[error("grammar is not supported")]
    Grammar,
    #[error("grammar is not valid: {0}")]
    InvalidGrammar(String),
    #[error("`best_of` != 1 is not supported when streaming tokens")]
    BestOfStream,
    #[error("`decoder_input_details` == true is not supported when streaming tokens")]
    PrefillDetailsStream,
    #[error("{0}")]
    Other(String),
}

#[derive(Debug, Error)]
pub enum InferError {
    #[error("Request failed during generation: {0}")]
    GenerationError(String),
    #[error("Model is overloaded")]
    Overloaded,
    #[error("Input validation error: {0}")]
    ValidationError(#[from] ValidationError),
    #[error("Incomplete generation")]
    IncompleteGeneration,
    #[error("Template error: {0}")]
    TemplateError(String),
    #[error("Tool error: {0}")]
    ToolError(String),
}

impl InferError {
    pub fn error_type(&self) -> &'static str {
        match self {
            InferError::GenerationError(_) => "generation",
            InferError::Overloaded => "overloaded",
            InferError::ValidationError(_) => "validation",
            InferError::IncompleteGeneration => "incomplete_generation",
            InferError::TemplateError(_) => "template_error",
            InferError::ToolError(_) => "tool_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            InferError::GenerationError(_) => StatusCode::FAILED_DEPENDENCY,
            InferError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            InferError::ValidationError(_)
            | InferError::TemplateError(_)
            | InferError::ToolError(_) => StatusCode::UNPROCESSABLE_ENTITY,
            InferError::IncompleteGeneration => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Counts the failure in `tgi_request_failure{err}`.
    pub fn record(&self) {
        let err = match self {
            InferError::GenerationError(_) => "generation",
            InferError::Overloaded => "overloaded",
            InferError::ValidationError(_) => "validation",
            InferError::IncompleteGeneration => "incomplete",
            InferError::TemplateError(_) => "template",
            InferError::ToolError(_) => "tool",
        };
        metrics::counter!("tgi_request_failure", "err" => err).increment(1);
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.to_string(),
            error_type: self.error_type().to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: String,
}

impl IntoResponse for InferError {
    fn into_response(self) -> Response {
        self.record();
        (self.status(), Json(self.body())).into_response()
    }
}
