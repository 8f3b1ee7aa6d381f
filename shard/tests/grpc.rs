//! The shard over its real gRPC interface (tonic over a Unix socket), through the v3 call
//! sequence: Info, Health, Warmup, Prefill, Decode, FilterBatch, ClearCache. Bad requests get a
//! gRPC error and the shard keeps serving. KV blocks behave as the router relies on: a cached
//! prefix is reused, and blocks freed by one request carry nothing into the next.

mod common;

use std::path::{Path, PathBuf};

use tessera_proto as pb;
use tessera_proto::text_generation_service_client::TextGenerationServiceClient;
use tessera_shard::service::{socket_path, ShardService};
use tessera_shard::Runner;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny/tiny-llama")
}

fn request(id: u64, inputs: &str, max_new_tokens: u32, blocks: Vec<u32>) -> pb::Request {
    pb::Request {
        blocks,
        id,
        inputs: inputs.into(),
        add_special_tokens: true,
        parameters: Some(pb::NextTokenChooserParameters {
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens,
            stop_sequences: vec![],
            ignore_eos_token: true,
        }),
        ..Default::default()
    }
}

async fn serve(base: &str) -> TextGenerationServiceClient<Channel> {
    let runner = Runner::load(&model(), Some("float32"), common::device())
        .expect("run `make test-models` first");
    let path = socket_path(base, 0);
    let listener = UnixListener::bind(&path).expect("bind");
    let service = ShardService::new(runner, base, 1, 0.5).into_server();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    common::connect_uds(path).await
}

#[tokio::test]
async fn v3_call_sequence_and_errors() {
    let dir = std::env::temp_dir().join(format!("tessera-grpc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let base = dir.join("shard").display().to_string();
    let mut c = serve(&base).await;

    let info = c.info(pb::InfoRequest {}).await.expect("info").into_inner();
    assert_eq!(
        (
            info.dtype.as_str(),
            info.device_type.as_str(),
            info.requires_padding
        ),
        (
            "float32",
            if common::device().is_cuda() {
                "cuda"
            } else {
                "cpu"
            },
            false
        )
    );
    let urls = c
        .service_discovery(pb::ServiceDiscoveryRequest {})
        .await
        .expect("discovery")
        .into_inner()
        .urls;
    assert_eq!(urls, vec![format!("unix://{base}-0")]);
    c.health(pb::HealthRequest {}).await.expect("health");

    let warm = pb::WarmupRequest {
        batch: Some(pb::Batch {
            id: 0,
            requests: vec![pb::Request {
                truncate: 200,
                ..request(0, &"word ".repeat(200), 2, vec![])
            }],
            size: 1,
            ..Default::default()
        }),
        max_input_tokens: None,
        max_prefill_tokens: 256,
        max_total_tokens: None,
    };
    let w = c.warmup(warm).await.expect("warmup").into_inner();
    assert_eq!(
        (w.max_total_tokens, w.max_input_tokens),
        (512, 511),
        "tiny-llama has 512 positions"
    );
    assert!(w.max_supported_total_tokens.expect("supported") >= 512);
    let too_big = pb::WarmupRequest {
        max_total_tokens: Some(100_000),
        ..Default::default()
    };
    assert!(
        c.warmup(too_big).await.is_err(),
        "a limit beyond the model must be refused"
    );

    // A request that cannot fit the model is refused; the shard keeps serving.
    let bad = pb::Batch {
        id: 1,
        requests: vec![request(1, "Hello", 10_000, vec![1])],
        size: 1,
        ..Default::default()
    };
    let err = c
        .prefill(pb::PrefillRequest {
            batch: Some(bad),
            cached_batch: None,
        })
        .await
        .expect_err("too long");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    let batch = pb::Batch {
        id: 2,
        requests: vec![
            request(10, "Hello", 5, vec![1]),
            request(11, "The quick brown fox", 5, vec![2]),
        ],
        size: 2,
        ..Default::default()
    };
    let p = c
        .prefill(pb::PrefillRequest {
            batch: Some(batch),
            cached_batch: None,
        })
        .await
        .expect("prefill")
        .into_inner();
    assert_eq!(p.generations.len(), 2);
    let cached = p.batch.expect("running batch");
    assert_eq!(
        (cached.id, cached.request_ids.clone(), cached.size),
        (2, vec![10, 11], 2)
    );
    let d = c
        .decode(pb::DecodeRequest {
            batches: vec![cached],
        })
        .await
        .expect("decode")
        .into_inner();
    assert_eq!(d.generations.len(), 2);
    // Drop request 10; only 11 continues.
    let f = c
        .filter_batch(pb::FilterBatchRequest {
            batch_id: 2,
            request_ids: vec![11],
        })
        .await
        .expect("filter")
        .into_inner();
    let kept = f.batch.expect("kept");
    assert_eq!(kept.request_ids, vec![11]);
    let d = c
        .decode(pb::DecodeRequest {
            batches: vec![kept.clone()],
        })
        .await
        .expect("decode")
        .into_inner();
    assert_eq!(
        d.generations
            .iter()
            .map(|g| g.request_id)
            .collect::<Vec<_>>(),
        vec![11]
    );
    c.clear_cache(pb::ClearCacheRequest { id: None })
        .await
        .expect("clear");
    let gone = c
        .decode(pb::DecodeRequest {
            batches: vec![kept],
        })
        .await
        .expect_err("cleared");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    c.health(pb::HealthRequest {}).await.expect("still healthy");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `requests` as one batch through Prefill and Decode; returns each request's tokens.
async fn run(
    c: &mut TextGenerationServiceClient<Channel>,
    id: u64,
    requests: Vec<pb::Request>,
) -> std::collections::HashMap<u64, Vec<u32>> {
    let mut out = std::collections::HashMap::<u64, Vec<u32>>::new();
    let batch = pb::Batch {
        id,
        size: requests.len() as u32,
        requests,
        ..Default::default()
    };
    let p = c
        .prefill(pb::PrefillRequest {
            batch: Some(batch),
            cached_batch: None,
        })
        .await
        .expect("prefill")
        .into_inner();
    let (mut gens, mut cached) = (p.generations, p.batch);
    loop {
        for g in &gens {
            out.entry(g.request_id)
                .or_default()
                .extend(g.tokens.as_ref().expect("tokens").ids.iter().copied());
        }
        let Some(b) = cached.take() else { break };
        let d = c
            .decode(pb::DecodeRequest { batches: vec![b] })
            .await
            .expect("decode")
            .into_inner();
        (gens, cached) = (d.generations, d.batch);
    }
    out
}

#[tokio::test]
async fn kv_blocks_are_reused_without_contamination() {
    let dir = std::env::temp_dir().join(format!("tessera-grpc-blocks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let base = dir.join("shard").display().to_string();
    let mut c = serve(&base).await;
    c.warmup(pb::WarmupRequest {
        max_prefill_tokens: 64,
        ..Default::default()
    })
    .await
    .expect("warmup");
    let long = "The Python interpreter reads a program, splits it into tokens, parses those tokens";
    let short = "Hello";
    // Reference outputs, each on fresh blocks.
    let a = run(&mut c, 1, vec![request(1, long, 8, vec![1, 2, 3])]).await[&1].clone();
    let b = run(&mut c, 2, vec![request(2, short, 8, vec![4])]).await[&2].clone();
    // Blocks 1-3 were freed by request 1 (from the router's point of view) and now hold its
    // K/V. A different prompt on them must not see any of it.
    let reused = run(&mut c, 3, vec![request(3, short, 8, vec![3])]).await;
    assert_eq!(
        reused[&3], b,
        "a freed block leaked K/V into a new sequence"
    );
    let reused = run(&mut c, 4, vec![request(4, short, 8, vec![1])]).await;
    assert_eq!(reused[&4], b);
    // Rewrite the long prompt's blocks, then reuse its first block as a cached prefix.
    let again = run(&mut c, 5, vec![request(5, long, 8, vec![5, 6, 7])]).await;
    assert_eq!(again[&5], a);
    let prefixed = pb::Request {
        cache_len: 16,
        ..request(6, long, 8, vec![5, 8, 9])
    };
    let cached = run(&mut c, 6, vec![prefixed]).await;
    assert_eq!(cached[&6], a, "a cached prefix must give the same output");
    // A prefix the router believes cached in blocks this shard never wrote (it restarted):
    // the shard computes the whole prompt instead of reading garbage.
    let stale = pb::Request {
        cache_len: 16,
        ..request(60, long, 8, vec![20, 21, 22])
    };
    assert_eq!(run(&mut c, 60, vec![stale]).await[&60], a);
    // Two sequences sharing the prefix block at once, in one batch.
    let shared = vec![
        pb::Request {
            cache_len: 16,
            ..request(7, long, 8, vec![5, 10, 11])
        },
        pb::Request {
            cache_len: 16,
            ..request(8, long, 8, vec![5, 12, 13])
        },
    ];
    let both = run(&mut c, 7, shared).await;
    assert_eq!((&both[&7], &both[&8]), (&a, &a));

    // Malformed block tables are refused with INVALID_ARGUMENT, and nothing else breaks.
    let bad = |r: pb::Request| pb::PrefillRequest {
        batch: Some(pb::Batch {
            id: 9,
            size: 1,
            requests: vec![r],
            ..Default::default()
        }),
        cached_batch: None,
    };
    for (what, r) in [
        ("no blocks", request(9, short, 4, vec![])),
        (
            "block outside the pool",
            request(9, short, 4, vec![u32::MAX / 32]),
        ),
        ("too few blocks", request(9, long, 40, vec![14])),
        (
            "slots not matching blocks",
            pb::Request {
                slots: vec![7],
                ..request(9, short, 4, vec![14])
            },
        ),
        (
            "whole prompt cached",
            pb::Request {
                cache_len: 50,
                ..request(9, short, 4, vec![14])
            },
        ),
    ] {
        let err = c.prefill(bad(r)).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err}");
    }
    let after = run(&mut c, 10, vec![request(10, short, 8, vec![14])]).await;
    assert_eq!(after[&10], b);
    let _ = std::fs::remove_dir_all(&dir);
}
