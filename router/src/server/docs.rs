//! The OpenAPI document, generated from the handlers' and types' annotations, served at
//! `/api-doc/openapi.json` with Swagger UI at `/docs` (bundled, nothing fetched at runtime).

use axum::Router;
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, Schema};
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
        types::StreamResponse, types::StreamEvent, types::StreamDetails, types::Info, ErrorResponse,
        openai_types::ChatRequest, openai_types::Message, openai_types::Content, openai_types::ContentPart,
        openai_types::Stop, openai_types::StreamOptions, openai_types::ChatCompletion, openai_types::ChatCompletionChunk,
        openai_types::CompletionRequest, openai_types::Prompt, openai_types::Completion, openai_types::Usage,
        openai_types::ModelList, openai_types::StreamError, openai_types::ChatStreamEvent,
        openai_types::CompletionStreamEvent,
        tokenize::SimpleToken, tokenize::ChatTokenizeResponse,
    )),
    tags(
        (name = "Text Generation Inference", description = "TGI's API"),
        (name = "OpenAI", description = "OpenAI-compatible API"),
    ),
    modifiers(&RequestErrors),
)]
pub struct ApiDoc;

/// An SSE event as OpenAPI 3.1 describes one: its `data` is JSON of `payload` (or, on the
/// OpenAI routes, the closing `[DONE]`).
fn event_envelope(payload: RefOr<Schema>, done: bool) -> RefOr<Schema> {
    let json = serde_json::json!({
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": payload,
    });
    let data = if done {
        serde_json::json!({"oneOf": [{"const": "[DONE]"}, json]})
    } else {
        json
    };
    let envelope = serde_json::json!({
        "type": "object",
        "required": ["data"],
        "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"}},
    });
    serde_json::from_value(envelope).unwrap_or(RefOr::T(Schema::default()))
}

/// The answers every route can give before its handler runs: a missing or wrong API key, and
/// for bodies a wrong content type or one over `--payload-limit`. Documented once here rather
/// than on every handler.
struct RequestErrors;

impl utoipa::Modify for RequestErrors {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let error = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorResponse")))
                        .build(),
                )
                .build()
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            for op in [item.get.as_mut(), item.post.as_mut()]
                .into_iter()
                .flatten()
            {
                let responses = &mut op.responses.responses;
                for response in responses.values_mut() {
                    if let utoipa::openapi::RefOr::T(r) = response {
                        if let Some(RefOr::T(sse)) = r.content.get_mut("text/event-stream") {
                            sse.schema = sse
                                .schema
                                .take()
                                .map(|s| event_envelope(s, path.starts_with("/v1/")));
                        }
                    }
                }
                responses.entry("401".into()).or_insert_with(|| {
                    ResponseBuilder::new()
                        .description("Missing or wrong API key (with `--api-key`); no body")
                        .build()
                        .into()
                });
                if op.request_body.is_some() {
                    responses
                        .entry("413".into())
                        .or_insert_with(|| error("Body over `--payload-limit`").into());
                    responses.entry("415".into()).or_insert_with(|| {
                        error("`Content-Type` is not `application/json`").into()
                    });
                }
            }
        }
    }
}

pub fn routes() -> Router {
    Router::new().merge(SwaggerUi::new("/docs").url("/api-doc/openapi.json", ApiDoc::openapi()))
}
