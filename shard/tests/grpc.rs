//! The shard over its real gRPC interface (tonic over a Unix socket), through the v3 call
//! sequence: Info, Health, Warmup, Prefill, Decode, FilterBatch, ClearCache. Bad requests get a
//! gRPC error and the shard keeps serving.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tch::Device;
use tessera_proto as pb;
use tessera_proto::text_generation_service_client::TextGenerationServiceClient;
use tessera_shard::service::{socket_path, ShardService};
use tessera_shard::Runner;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny/tiny-llama")
}

fn request(id: u64, inputs: &str, max_new_tokens: u32) -> pb::Request {
    pb::Request {
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
    let runner =
        Runner::load(&model(), Some("float32"), Device::Cpu).expect("run `make test-models` first");
    let path = socket_path(base, 0);
    let listener = UnixListener::bind(&path).expect("bind");
    let service = ShardService::new(runner, base, 1, 0.5).into_server();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect");
    TextGenerationServiceClient::new(channel)
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
        ("float32", "cpu", false)
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
            requests: vec![request(0, &"word ".repeat(200), 2)],
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
        requests: vec![request(1, "Hello", 10_000)],
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
            request(10, "Hello", 5),
            request(11, "The quick brown fox", 5),
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
