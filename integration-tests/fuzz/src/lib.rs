//! The bodies of the fuzz targets, shared by the libFuzzer binaries in `fuzz_targets/` (`make
//! fuzz`) and by `tests/seeds.rs`, which replays every input of `corpus/` on stable Rust in
//! `make test`.
//!
//! Each target takes arbitrary bytes and must return without panicking. Where more than "no
//! panic" can be said cheaply, it is asserted: messages survive a protobuf round trip, and any
//! token text comes out of SSE framing as exactly one event holding the same text, by the
//! spec's line rules and by the looser ones of Python's `str.splitlines`.
//!
//! The targets run the real code on a real tokenizer and real chat templates (the tiny test
//! checkpoints and the templates `make test-models` fetches), up to the point where a request
//! would be queued for the shards, and on the shard side up to a sequence admitted into a KV
//! pool.

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use axum::response::sse::Sse;
use axum::response::IntoResponse;
use prost::Message;
use serde_json::{json, Value};
use tessera_proto as pb;
use tessera_router::chat_template::{ChatTemplate, TemplateInputs};
use tessera_router::grammar::Grammars;
use tessera_router::server::openai::prepare;
use tessera_router::server::openai_types::{ChatRequest, CompletionRequest, Prompt};
use tessera_router::server::sse;
use tessera_router::server::types::{CompatGenerateRequest, GenerateParameters, GenerateRequest};
use tessera_router::validation::{Limits, Validation};
use tessera_shard::kv_cache::{KvLayout, KvPool};
use tokenizers::Tokenizer;

/// The checkpoints and templates the targets run against, relative to the repository.
fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

struct Router {
    runtime: tokio::runtime::Runtime,
    validation: Validation,
    /// Every real template in the test models: Llama 2-style, ChatML (SmolLM2, Qwen2), Qwen3's
    /// and Llama 3.1's with tools.
    templates: Vec<ChatTemplate>,
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let dir = models().join("tiny/tiny-llama");
        let files = tessera_router::model_files::ModelFiles::load(&dir, None)
            .unwrap_or_else(|e| panic!("{e}: run `make test-models` first"));
        let limits = Limits {
            max_best_of: 2,
            max_stop_sequences: 4,
            max_top_n_tokens: 5,
            max_input_tokens: 1024,
            max_total_tokens: 2048,
        };
        let validation = Validation::new(Arc::new(files.tokenizer), limits, Grammars::new(true));
        let mut templates = Vec::new();
        for dir in [
            "tiny/tiny-llama",
            "tiny/tiny-qwen2",
            "SmolLM2-135M-Instruct",
            "templates/qwen3",
            "templates/llama3_1",
        ] {
            let Ok(files) =
                tessera_router::model_files::ModelFiles::load(&models().join(dir), None)
            else {
                continue;
            };
            if let Some(source) = &files.chat_template {
                let t = ChatTemplate::new(source, files.bos_token.clone(), files.eos_token.clone());
                templates.push(t.unwrap_or_else(|e| panic!("{dir}: {e}")));
            }
        }
        assert!(
            !templates.is_empty(),
            "no chat templates under {}",
            models().display()
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Router {
            runtime,
            validation,
            templates,
        }
    })
}

/// Validation as the routes run it: parameters, tokenization, limits and the grammar.
fn validate(r: &Router, inputs: String, parameters: GenerateParameters) {
    let _ = r
        .runtime
        .block_on(r.validation.validate(inputs, parameters, true));
}

/// A request body on every route that takes one: TGI's `/generate` and `/`, OpenAI's chat and
/// completions. Whatever parses goes through the route's own preparation and validation.
pub fn request_json(data: &[u8]) {
    let r = router();
    if let Ok(req) = serde_json::from_slice::<GenerateRequest>(data) {
        validate(r, req.inputs, req.parameters);
    }
    if let Ok(req) = serde_json::from_slice::<CompatGenerateRequest>(data) {
        validate(r, req.inputs, req.parameters);
    }
    if let Ok(req) = serde_json::from_slice::<CompletionRequest>(data) {
        let prompts = match req.prompt {
            Prompt::One(p) => vec![p],
            Prompt::Many(v) => v,
        };
        for prompt in prompts.into_iter().take(4) {
            let parameters = GenerateParameters {
                max_new_tokens: req.max_tokens,
                top_p: req.top_p,
                temperature: req.temperature,
                seed: req.seed,
                ..Default::default()
            };
            validate(r, prompt, parameters);
        }
    }
    if let Ok(req) = serde_json::from_slice::<ChatRequest>(data) {
        chat(r, &r.templates[data.len() % r.templates.len()], req);
    }
}

/// A chat request through the route's preparation: tools and `response_format` to a grammar,
/// messages through the template, then validation with the grammar attached.
fn chat(r: &Router, template: &ChatTemplate, req: ChatRequest) {
    let Ok((prompt, mut parameters, spec, _)) = prepare(Some(template), req) else {
        return;
    };
    if let Some(spec) = spec {
        match r.runtime.block_on(r.validation.grammars.regex(spec)) {
            Ok(regex) => {
                let grammar = json!({"type": "regex", "value": regex.to_string()});
                parameters.grammar = grammar.as_object().cloned();
            }
            Err(_) => return,
        }
    }
    validate(r, prompt, parameters);
}

/// Chat templates: the first byte picks one of the real templates. The rest is a chat request
/// (messages, tools, `chat_template_kwargs`), or, when it is not one, any JSON array handed to
/// the template as the messages, which reaches corners a typed request cannot.
pub fn chat_template(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let r = router();
    let template = &r.templates[pick as usize % r.templates.len()];
    if let Ok(req) = serde_json::from_slice::<ChatRequest>(rest) {
        chat(r, template, req);
    } else if let Ok(Value::Array(messages)) = serde_json::from_slice::<Value>(rest) {
        let _ = template.apply(&messages, &TemplateInputs::default());
    }
}

/// The `data` of every event in `bytes`, by the SSE spec: lines end at CRLF, LF or CR, a blank
/// line dispatches, `data:` lines (one optional space after the colon) join with LF.
fn spec_events(bytes: &str) -> Vec<String> {
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    for line in bytes.split("\r\n").flat_map(|l| l.split(['\n', '\r'])) {
        if line.is_empty() {
            events.extend(data.take());
        } else if let Some(value) = line.strip_prefix("data:") {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            }
        }
    }
    events
}

/// The lines Python's `str.splitlines` sees, as a client built on it would.
fn python_lines(bytes: &str) -> Vec<&str> {
    const BREAKS: [char; 10] = [
        '\n', '\r', '\u{b}', '\u{c}', '\u{1c}', '\u{1d}', '\u{1e}', '\u{85}', '\u{2028}',
        '\u{2029}',
    ];
    bytes.split(BREAKS).collect()
}

/// Token text, any bytes a model could produce, framed as a streamed event.
pub fn sse_framing(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let payload = json!({
        "index": 1,
        "token": {"id": 7, "text": text, "logprob": -0.5, "special": false},
        "generated_text": text,
    });
    let stream = futures::stream::iter([Ok::<_, Infallible>(sse::event(&payload))]);
    let body = Sse::new(stream).into_response().into_body();
    let bytes = router()
        .runtime
        .block_on(axum::body::to_bytes(body, usize::MAX))
        .expect("an SSE body");
    let framed = std::str::from_utf8(&bytes).expect("SSE is UTF-8");
    let events = spec_events(framed);
    assert_eq!(events.len(), 1, "one event by the spec: {framed:?}");
    let back: Value = serde_json::from_str(&events[0]).expect("the event is JSON");
    assert_eq!(back, payload, "the event holds the same payload");
    let data_lines: Vec<&str> = python_lines(framed)
        .into_iter()
        .filter(|l| l.starts_with("data:"))
        .collect();
    assert_eq!(
        data_lines.len(),
        1,
        "one data line for splitlines: {framed:?}"
    );
    assert_eq!(
        data_lines[0].trim_start_matches("data:").trim_start(),
        events[0]
    );
}

struct Shard {
    tokenizer: Tokenizer,
    grammars: tessera_shard::grammar::Grammars,
    pool: KvPool,
}

fn shard() -> &'static std::sync::Mutex<Shard> {
    static SHARD: OnceLock<std::sync::Mutex<Shard>> = OnceLock::new();
    SHARD.get_or_init(|| {
        let path = models().join("tiny/tiny-llama/tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path)
            .unwrap_or_else(|e| panic!("{}: {e}: run `make test-models` first", path.display()));
        let width = tokenizer.get_vocab_size(true) as i64;
        let grammars = tessera_shard::grammar::Grammars::new(&tokenizer, 2, &HashSet::new(), width);
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 4,
            kind: tch::Kind::Float,
            device: tch::Device::Cpu,
        };
        let pool = KvPool::new(layout, 16, 64).expect("a small KV pool");
        std::sync::Mutex::new(Shard {
            tokenizer,
            grammars,
            pool,
        })
    })
}

/// Decodes `data` as `M` and checks that encoding and decoding again changes nothing. The
/// bytes are compared, not the messages: a float field may hold NaN, which equals nothing.
fn round_trip<M: Message + Default>(data: &[u8]) -> Option<M> {
    let message = M::decode(data).ok()?;
    let bytes = message.encode_to_vec();
    let again = M::decode(bytes.as_slice()).expect("re-encoded bytes decode");
    assert_eq!(
        again.encode_to_vec(),
        bytes,
        "a protobuf round trip changes nothing"
    );
    Some(message)
}

/// The shard's side of the wire: every request message of `generate.v3` decoded from arbitrary
/// bytes, and each request of a decoded batch put through the admission checks that guard
/// the KV pool (block ids, slots, `cache_len`, `chunk_len`, lengths). Grammars are dropped
/// first: the router checks them, and compiling arbitrary regexes belongs to the request
/// target.
pub fn proto_decode(data: &[u8]) {
    let _ = round_trip::<pb::DecodeRequest>(data);
    let _ = round_trip::<pb::FilterBatchRequest>(data);
    let _ = round_trip::<pb::ClearCacheRequest>(data);
    let _ = round_trip::<pb::WarmupRequest>(data);
    let Some(prefill) = round_trip::<pb::PrefillRequest>(data) else {
        return;
    };
    let shard = shard().lock().unwrap_or_else(|p| p.into_inner());
    for mut request in prefill.batch.map(|b| b.requests).unwrap_or_default() {
        if let Some(p) = request.parameters.as_mut() {
            p.grammar.clear();
        }
        let _ = tessera_shard::admission::new_sequence(
            &shard.tokenizer,
            &shard.grammars,
            &shard.pool,
            512,
            &request,
        );
    }
}
