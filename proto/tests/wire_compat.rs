//! Golden test of wire compatibility with TGI's `generate.v3`: every field of the messages
//! the router and shards exchange is encoded, and the (field number, wire type) pairs on the
//! wire are compared with the numbers TGI's proto assigns. Renumbering a field, which would
//! silently break interop with TGI's router, fails here.

use prost::encoding::{decode_key, WireType};
use prost::Message;
use tessera_proto as pb;

/// The top-level (field number, wire type) pairs of an encoded message, in order.
fn fields(bytes: &[u8]) -> Vec<(u32, WireType)> {
    let mut buf = bytes;
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).expect("key");
        out.push((tag, wire));
        match wire {
            WireType::Varint => {
                prost::encoding::decode_varint(&mut buf).expect("varint");
            }
            WireType::ThirtyTwoBit => buf = &buf[4..],
            WireType::SixtyFourBit => buf = &buf[8..],
            WireType::LengthDelimited => {
                let len = prost::encoding::decode_varint(&mut buf).expect("len") as usize;
                buf = &buf[len..];
            }
            other => panic!("unexpected wire type {other:?}"),
        }
    }
    out.sort_by_key(|f| f.0);
    out.dedup();
    out
}

use WireType::{LengthDelimited as L, ThirtyTwoBit as F32, Varint as V};

#[test]
fn request_and_parameters() {
    let params = pb::NextTokenChooserParameters {
        temperature: 0.5,
        top_k: 3,
        top_p: 0.5,
        typical_p: 0.5,
        do_sample: true,
        seed: 9,
        repetition_penalty: 1.5,
        frequency_penalty: 0.5,
        watermark: true,
        grammar: "x".into(),
        grammar_type: pb::GrammarType::Regex as i32,
        presence_penalty: 0.5,
    };
    // 1001 is Tessera's own extension; TGI's numbers are unchanged.
    assert_eq!(
        fields(&params.encode_to_vec()),
        vec![
            (1, F32),
            (2, V),
            (3, F32),
            (4, F32),
            (5, V),
            (6, V),
            (7, F32),
            (8, V),
            (9, F32),
            (10, L),
            (11, V),
            (1001, F32)
        ]
    );
    let stop = pb::StoppingCriteriaParameters {
        max_new_tokens: 1,
        stop_sequences: vec!["s".into()],
        ignore_eos_token: true,
    };
    assert_eq!(fields(&stop.encode_to_vec()), vec![(1, V), (2, L), (3, V)]);
    let req = pb::Request {
        id: 1,
        input_chunks: Some(pb::Input {
            chunks: vec![pb::InputChunk {
                chunk: Some(pb::input_chunk::Chunk::Text("a".into())),
            }],
        }),
        inputs: "a".into(),
        truncate: 1,
        parameters: Some(params),
        stopping_parameters: Some(stop),
        prefill_logprobs: true,
        top_n_tokens: 1,
        blocks: vec![1],
        slots: vec![1],
        adapter_id: Some("a".into()),
        cache_len: 1,
        add_special_tokens: true,
        chunk_len: Some(1),
    };
    assert_eq!(
        fields(&req.encode_to_vec()),
        vec![
            (1, V),
            (2, L),
            (3, V),
            (4, L),
            (5, L),
            (6, V),
            (7, V),
            (8, L),
            (9, L),
            (10, L),
            (11, L),
            (12, V),
            (13, V),
            (14, V)
        ]
    );
    let chunk = pb::InputChunk {
        chunk: Some(pb::input_chunk::Chunk::Image(pb::Image {
            data: vec![1],
            mimetype: "m".into(),
        })),
    };
    assert_eq!(fields(&chunk.encode_to_vec()), vec![(2, L)]);
}

#[test]
fn batches_and_generations() {
    let batch = pb::Batch {
        id: 1,
        requests: vec![pb::Request::default()],
        size: 1,
        max_tokens: 1,
        max_blocks: 1,
    };
    assert_eq!(
        fields(&batch.encode_to_vec()),
        vec![(1, V), (2, L), (3, V), (4, V), (5, V)]
    );
    let cached = pb::CachedBatch {
        id: 1,
        request_ids: vec![1],
        size: 1,
        max_tokens: 1,
        current_tokens: 1,
    };
    assert_eq!(
        fields(&cached.encode_to_vec()),
        vec![(1, V), (2, L), (3, V), (4, V), (5, V)]
    );
    let tokens = pb::Tokens {
        ids: vec![1],
        logprobs: vec![0.5],
        texts: vec!["a".into()],
        is_special: vec![true],
    };
    assert_eq!(
        fields(&tokens.encode_to_vec()),
        vec![(1, L), (2, L), (3, L), (4, L)]
    );
    let done = pb::GeneratedText {
        text: "a".into(),
        generated_tokens: 1,
        finish_reason: pb::FinishReason::StopSequence as i32,
        seed: Some(1),
    };
    assert_eq!(
        fields(&done.encode_to_vec()),
        vec![(1, L), (2, V), (3, V), (4, V)]
    );
    let g = pb::Generation {
        request_id: 1,
        prefill_tokens: Some(tokens.clone()),
        tokens: Some(tokens.clone()),
        generated_text: Some(done),
        top_tokens: vec![tokens],
    };
    assert_eq!(
        fields(&g.encode_to_vec()),
        vec![(1, V), (2, L), (3, L), (4, L), (5, L)]
    );
    let step = pb::DecodeResponse {
        generations: vec![g],
        batch: Some(cached.clone()),
        forward_ns: 1,
        decode_ns: 1,
        total_ns: 1,
        concat_ns: Some(1),
    };
    assert_eq!(
        fields(&step.encode_to_vec()),
        vec![(1, L), (2, L), (3, V), (4, V), (5, V), (6, V)]
    );
    let prefill = pb::PrefillRequest {
        batch: Some(batch),
        cached_batch: Some(cached.clone()),
    };
    assert_eq!(fields(&prefill.encode_to_vec()), vec![(1, L), (2, L)]);
    let filter = pb::FilterBatchRequest {
        batch_id: 1,
        request_ids: vec![1],
    };
    assert_eq!(fields(&filter.encode_to_vec()), vec![(1, V), (2, L)]);
    assert_eq!(
        fields(
            &pb::DecodeRequest {
                batches: vec![cached]
            }
            .encode_to_vec()
        ),
        vec![(1, L)]
    );
    assert_eq!(
        fields(&pb::ClearCacheRequest { id: Some(0) }.encode_to_vec()),
        vec![(1, V)]
    );
}

#[test]
fn info_and_warmup() {
    let info = pb::InfoResponse {
        requires_padding: true,
        dtype: "d".into(),
        device_type: "c".into(),
        window_size: Some(1),
        speculate: 1,
        support_chunking: true,
        use_prefix_caching: true,
        attention_impl: "a".into(),
        block_size: 1,
    };
    assert_eq!(
        fields(&info.encode_to_vec()),
        vec![
            (1, V),
            (2, L),
            (3, L),
            (4, V),
            (5, V),
            (6, V),
            (7, V),
            (8, L),
            (9, V)
        ]
    );
    let w = pb::WarmupRequest {
        batch: Some(pb::Batch::default()),
        max_input_tokens: Some(1),
        max_prefill_tokens: 1,
        max_total_tokens: Some(1),
    };
    assert_eq!(
        fields(&w.encode_to_vec()),
        vec![(1, L), (2, V), (3, V), (4, V)]
    );
    let r = pb::WarmupResponse {
        max_supported_total_tokens: Some(1),
        max_input_tokens: 1,
        max_total_tokens: 1,
    };
    assert_eq!(fields(&r.encode_to_vec()), vec![(1, V), (2, V), (3, V)]);
    let d = pb::ServiceDiscoveryResponse {
        urls: vec!["u".into()],
    };
    assert_eq!(fields(&d.encode_to_vec()), vec![(1, L)]);
    // Enum values are part of the wire format too.
    assert_eq!(
        (
            pb::FinishReason::Length as i32,
            pb::FinishReason::EosToken as i32,
            pb::FinishReason::StopSequence as i32
        ),
        (0, 1, 2)
    );
    assert_eq!(
        (
            pb::GrammarType::None as i32,
            pb::GrammarType::Json as i32,
            pb::GrammarType::Regex as i32
        ),
        (0, 1, 2)
    );
}

#[test]
fn service_path_matches_tgi() {
    // TGI's router calls `/generate.v3.TextGenerationService/<Method>`.
    let src = include_str!("../generate.proto");
    assert!(src.contains("package generate.v3;"));
    assert!(src.contains("service TextGenerationService"));
    for rpc in [
        "Info",
        "ServiceDiscovery",
        "ClearCache",
        "FilterBatch",
        "Warmup",
        "Prefill",
        "Decode",
        "Health",
    ] {
        assert!(src.contains(&format!("rpc {rpc} (")), "missing rpc {rpc}");
    }
}
