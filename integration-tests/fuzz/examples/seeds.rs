//! Writes the seed corpora in `corpus/` (`cargo run -p tessera-fuzz --example seeds`): a few
//! valid inputs per target and the edge cases a fuzzer would take long to reach, so both the
//! replay in `make test` and a fuzzing run start from the interesting shapes.

use std::path::Path;

use prost::Message;
use tessera_proto as pb;

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus folder");
    std::fs::write(dir.join(format!("seed-{name}")), data).expect("seed file");
}

fn request(id: u64, text: &str, blocks: Vec<u32>, slots: Vec<u32>) -> pb::Request {
    pb::Request {
        id,
        inputs: text.into(),
        parameters: Some(pb::NextTokenChooserParameters {
            temperature: 1.0,
            top_p: 1.0,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: 8,
            ..Default::default()
        }),
        blocks,
        slots,
        add_special_tokens: true,
        ..Default::default()
    }
}

fn prefill(requests: Vec<pb::Request>) -> Vec<u8> {
    pb::PrefillRequest {
        batch: Some(pb::Batch {
            id: 1,
            size: requests.len() as u32,
            requests,
            max_tokens: 64,
            max_blocks: 4,
        }),
        cached_batch: None,
    }
    .encode_to_vec()
}

fn protos() {
    let ok = request(1, "Hello there", vec![1], (16..26).collect());
    write("proto_decode", "prefill-valid", &prefill(vec![ok.clone()]));
    let cases: Vec<(&str, pb::Request)> = vec![
        (
            "block-out-of-pool",
            pb::Request {
                blocks: vec![9999],
                ..ok.clone()
            },
        ),
        (
            "block-zero",
            pb::Request {
                blocks: vec![0],
                ..ok.clone()
            },
        ),
        (
            "no-blocks",
            pb::Request {
                blocks: vec![],
                ..ok.clone()
            },
        ),
        (
            "slots-disagree",
            pb::Request {
                slots: vec![3, 1, 4],
                ..ok.clone()
            },
        ),
        (
            "cache-len-whole-prompt",
            pb::Request {
                cache_len: 1000,
                ..ok.clone()
            },
        ),
        (
            "chunk-len-zero",
            pb::Request {
                chunk_len: Some(0),
                ..ok.clone()
            },
        ),
        (
            "truncate-to-nothing",
            pb::Request {
                truncate: 1,
                inputs: String::new(),
                ..ok.clone()
            },
        ),
        (
            "huge-max-new",
            pb::Request {
                stopping_parameters: Some(pb::StoppingCriteriaParameters {
                    max_new_tokens: u32::MAX,
                    ..Default::default()
                }),
                ..ok.clone()
            },
        ),
        (
            "image-chunk",
            pb::Request {
                input_chunks: Some(pb::Input {
                    chunks: vec![pb::InputChunk {
                        chunk: Some(pb::input_chunk::Chunk::Image(pb::Image {
                            data: vec![1, 2, 3],
                            mimetype: "image/png".into(),
                        })),
                    }],
                }),
                ..ok.clone()
            },
        ),
    ];
    for (name, r) in cases {
        write("proto_decode", name, &prefill(vec![r]));
    }
    let two = vec![
        ok.clone(),
        request(2, "Same blocks", vec![1], (16..27).collect()),
    ];
    write("proto_decode", "two-share-a-block", &prefill(two));
    let decode = pb::DecodeRequest {
        batches: vec![pb::CachedBatch {
            id: 1,
            request_ids: vec![1, 2],
            size: 2,
            max_tokens: 64,
            current_tokens: 20,
        }],
    };
    write("proto_decode", "decode", &decode.encode_to_vec());
    let filter = pb::FilterBatchRequest {
        batch_id: 1,
        request_ids: vec![1, u64::MAX],
    };
    write("proto_decode", "filter", &filter.encode_to_vec());
    write("proto_decode", "truncated", &prefill(vec![ok])[..20]);
}

fn texts() {
    let requests: &[(&str, &str)] = &[
        (
            "generate",
            r#"{"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": true}}"#,
        ),
        (
            "generate-sampling",
            r#"{"inputs": "Hi", "parameters": {"do_sample": true, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "typical_p": 0.9, "seed": 3, "repetition_penalty": 1.1, "stop": ["\n"], "top_n_tokens": 2}}"#,
        ),
        (
            "generate-bad-numbers",
            r#"{"inputs": "Hi", "parameters": {"temperature": -1, "max_new_tokens": 4294967296, "top_p": 1e400}}"#,
        ),
        (
            "generate-grammar-json",
            r#"{"inputs": "Hi", "parameters": {"grammar": {"type": "json", "value": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]}}}}"#,
        ),
        (
            "generate-grammar-regex",
            r#"{"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "(a|b)*c{2,5}[0-9]+"}}}"#,
        ),
        (
            "compat-stream",
            r#"{"inputs": "Hi", "stream": true, "parameters": {"return_full_text": true}}"#,
        ),
        (
            "completions",
            r#"{"model": "tgi", "prompt": ["a", "b"], "max_tokens": 3, "temperature": 0, "seed": 1}"#,
        ),
        (
            "chat",
            r#"{"model": "tgi", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 4}"#,
        ),
        (
            "chat-parts",
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        ),
        (
            "chat-tools",
            r#"{"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}], "tool_choice": "required"}"#,
        ),
        (
            "chat-tool-result",
            r#"{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [{"id": "0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}, {"role": "tool", "tool_call_id": "0", "content": "sunny"}]}"#,
        ),
        (
            "chat-response-format",
            r#"{"messages": [{"role": "user", "content": "JSON"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "items": {"enum": ["a", 1, null]}, "maxItems": 3}}}}"#,
        ),
        (
            "chat-kwargs",
            r#"{"messages": [{"role": "user", "content": "Think"}], "chat_template_kwargs": {"enable_thinking": false}}"#,
        ),
        (
            "deep-nesting",
            &format!("{}{}", "[".repeat(2000), "]".repeat(2000)),
        ),
        ("not-utf8", "\u{fffd}"),
    ];
    for (name, body) in requests {
        write("request_json", name, body.as_bytes());
    }
    write(
        "request_json",
        "invalid-utf8",
        b"{\"inputs\": \"\xff\xfe\"}",
    );
    for (i, (name, body)) in requests
        .iter()
        .filter(|(n, _)| n.starts_with("chat"))
        .enumerate()
    {
        let mut data = vec![i as u8];
        data.extend_from_slice(body.as_bytes());
        write("chat_template", name, &data);
    }
    write(
        "chat_template",
        "raw-messages",
        b"\x02[{\"role\": \"user\", \"content\": 5}, {\"role\": null}, 7]",
    );
    write("chat_template", "raw-empty", b"\x03[]");
    let tokens: &[(&str, &[u8])] = &[
        ("plain", b"Hello, world"),
        ("newlines", b"a\nb\r\nc\rd\n\n"),
        ("sse-fields", b"\n\ndata: x\n\nevent: y\n: comment\n"),
        ("unicode-breaks", "x\u{85}y\u{2028}z\u{2029}".as_bytes()),
        ("controls", b"\x00\x0b\x0c\x1c\x1d\x1e\x7f"),
        ("broken-utf8", b"\xe2\x80"),
        ("cjk-emoji", "日本語 🙂".as_bytes()),
    ];
    for (name, text) in tokens {
        write("sse_framing", name, text);
    }
}

fn main() {
    protos();
    texts();
}
