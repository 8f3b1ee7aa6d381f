//! The router's own cost, measured from below: the same single-request batches that
//! `benchmark/load.py --concurrency 1` sends through the HTTP API, sent straight to the shard
//! over gRPC (Prefill, then Decode until done). The difference of the two runs' end-to-end
//! latency and time per output token is what the router adds per request and per token.
//!
//! Run against an idle server started with a known `--shard-uds-path`:
//! `cargo run --release -p tessera-benchmark --example shard_direct -- SOCKET FIRST_BLOCK [N] [NEW]`
//! where FIRST_BLOCK is a block id the router will not hand out during the run (the top of
//! the pool: `max_batch_total_tokens / 16 - 64` from `/info`).

use std::time::Instant;

use hyper_util::rt::TokioIo;
use tessera_proto as pb;
use tessera_proto::text_generation_service_client::TextGenerationServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

/// The prompts of `load.py --dist fixed` (its first word list, in its order).
const WORDS: &str = "time person year way day thing man world life hand part child eye woman place work week case point government company number group problem fact";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let socket = args
        .get(1)
        .ok_or("usage: shard_direct SOCKET FIRST_BLOCK [N] [NEW]")?
        .clone();
    let first: u32 = args.get(2).ok_or("FIRST_BLOCK")?.parse()?;
    let n: u64 = args.get(3).map_or(Ok(16), |s| s.parse())?;
    let new: u32 = args.get(4).map_or(Ok(64), |s| s.parse())?;
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    let mut client = TextGenerationServiceClient::new(channel);
    let words: Vec<&str> = WORDS.split(' ').collect();
    let (mut e2e, mut tpot) = (Vec::new(), Vec::new());
    for i in 0..n {
        // Same shape as load.py's fixed workload: 128 words after a request number.
        let prompt = format!(
            "Request {i}: {}",
            (0..128)
                .map(|j| words[(i as usize * 7 + j * 13) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        );
        let request = pb::Request {
            id: i,
            inputs: prompt,
            add_special_tokens: true,
            parameters: Some(pb::NextTokenChooserParameters {
                repetition_penalty: 1.0,
                ..Default::default()
            }),
            stopping_parameters: Some(pb::StoppingCriteriaParameters {
                max_new_tokens: new,
                ..Default::default()
            }),
            blocks: (first..first + 16).collect(),
            ..Default::default()
        };
        let start = Instant::now();
        let out = client
            .prefill(pb::PrefillRequest {
                batch: Some(pb::Batch {
                    id: i,
                    size: 1,
                    requests: vec![request],
                    ..Default::default()
                }),
                cached_batch: None,
            })
            .await?
            .into_inner();
        let first_token = Instant::now();
        let (mut cached, mut tokens) = (out.batch, out.generations.len());
        while let Some(b) = cached {
            let d = client
                .decode(pb::DecodeRequest { batches: vec![b] })
                .await?
                .into_inner();
            tokens += d.generations.len();
            cached = d.batch;
        }
        let end = Instant::now();
        e2e.push((end - start).as_secs_f64());
        if tokens > 1 {
            tpot.push((end - first_token).as_secs_f64() / (tokens - 1) as f64);
        }
    }
    let median = tessera_benchmark::median;
    println!(
        "{{\"requests\": {n}, \"median_e2e_s\": {:.4}, \"median_tpot_s\": {:.5}}}",
        median(&e2e),
        median(&tpot)
    );
    Ok(())
}
