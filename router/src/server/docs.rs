//! The OpenAPI document, generated from the handlers' and types' annotations, served at
//! `/api-doc/openapi.json` with Swagger UI at `/docs` (bundled, nothing fetched at runtime).

use axum::Router;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use super::{completions, generate, openai, openai_types, tokenize, types};
use crate::error::ErrorResponse;

#[derive(OpenApi)]
#[openapi(
    info(title = "Tessera", description = "Text generation (TGI-compatible) and OpenAI-compatible APIs", license(name = "Apache-2.0")),
    paths(
        generate::compat_generate,
        generate::generate,
        generate::generate_stream,
        openai::chat_completions,
        completions::completions,
        openai::models,
        tokenize::tokenize,
        tokenize::chat_tokenize,
        super::invocations,
        super::health,
        super::ping,
        super::root_health,
        super::info,
        super::metrics,
    ),
    components(schemas(
        types::GenerateRequest, types::CompatGenerateRequest, types::GenerateParameters, types::GenerateResponse,
        types::Details, types::BestOfSequence, types::Token, types::PrefillToken, types::FinishReason,
        types::StreamResponse, types::StreamDetails, types::Info, ErrorResponse,
        openai_types::ChatRequest, openai_types::Message, openai_types::Content, openai_types::ContentPart,
        openai_types::Stop, openai_types::StreamOptions, openai_types::ChatCompletion, openai_types::ChatCompletionChunk,
        openai_types::CompletionRequest, openai_types::Prompt, openai_types::Completion, openai_types::Usage,
        openai_types::ModelList, openai_types::StreamError,
        tokenize::SimpleToken, tokenize::ChatTokenizeResponse,
    )),
    tags(
        (name = "Text Generation Inference", description = "TGI's API"),
        (name = "OpenAI", description = "OpenAI-compatible API"),
    )
)]
pub struct ApiDoc;

pub fn routes() -> Router {
    Router::new().merge(SwaggerUi::new("/docs").url("/api-doc/openapi.json", ApiDoc::openapi()))
}
