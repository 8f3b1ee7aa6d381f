//! Shared helpers of the shard's integration tests: the tiny checkpoints, their transformers
//! references, protocol requests with KV blocks, a driver that runs batches to completion, and
//! a gRPC client for a shard's socket.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Device, Tensor};
use tessera_proto as pb;
use tessera_shard::kv_cache::KvPool;
use tessera_shard::model::{ForwardInput, PrefillSpan};
use tessera_shard::Runner;

/// Every architecture the shard supports, as a tiny random checkpoint.
pub const MODELS: &[&str] = &[
    "tiny-llama",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-phi3",
    "tiny-gemma2",
    "tiny-gpt2",
    "tiny-llama3rope",
    "tiny-llama-linrope",
];

pub const BLOCK: usize = 16;

/// The device the tests run on: `TESSERA_TEST_DEVICE=cuda` (or `cuda:N`, any name `--device`
/// takes) runs the same suite on a GPU (scripts/cuda_check.sh); CPU otherwise. Asking for CUDA
/// where there is none fails loudly rather than quietly testing the CPU again.
pub fn device() -> Device {
    let name = std::env::var("TESSERA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    tessera_shard::device::parse_device(Some(&name))
        .unwrap_or_else(|e| panic!("TESSERA_TEST_DEVICE={name}: {e}"))
}

/// The half-precision dtypes the tests check on `device()`: bf16 on CPU (f16 is not served
/// there), bf16 and f16 on CUDA.
pub fn half_dtypes() -> &'static [&'static str] {
    if device().is_cuda() {
        &["bfloat16", "float16"]
    } else {
        &["bfloat16"]
    }
}

/// A tonic client on the shard socket at `path` (the URI is required by tonic but unused).
pub async fn connect_uds(
    path: PathBuf,
) -> tessera_proto::text_generation_service_client::TextGenerationServiceClient<
    tonic::transport::Channel,
> {
    use hyper_util::rt::TokioIo;
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .expect("connect");
    tessera_proto::text_generation_service_client::TextGenerationServiceClient::new(channel)
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn refs(model: &str) -> Value {
    let path = root()
        .join("models/tiny-refs")
        .join(format!("{model}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. Run `make test-models` to create the test checkpoints",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("reference JSON")
}

pub fn cases(r: &Value) -> Vec<Value> {
    r["cases"].as_array().expect("cases").clone()
}

/// Loads `model` with a KV pool of `blocks` blocks.
pub fn load(model: &str, dtype: &str, blocks: usize) -> Runner {
    let mut runner = Runner::load(
        &root().join("models/tiny").join(model),
        Some(dtype),
        device(),
    )
    .expect("load model");
    runner.allocate_pool(blocks).expect("pool");
    runner
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect()
}

/// Hands out KV blocks the way a router would (block 0 stays reserved).
pub struct Blocks {
    next: u32,
}

impl Default for Blocks {
    fn default() -> Self {
        Self { next: 1 }
    }
}

impl Blocks {
    pub fn take(&mut self, tokens: usize) -> Vec<u32> {
        let n = tokens.div_ceil(BLOCK) as u32;
        let out = (self.next..self.next + n).collect();
        self.next += n;
        out
    }
}

/// A greedy request for a reference case, with blocks for its prompt plus `max_new`.
pub fn request(id: u64, case: &Value, max_new: u32, blocks: &mut Blocks) -> pb::Request {
    let prompt = ids(&case["input_ids"]).len();
    pb::Request {
        id,
        inputs: case["prompt"].as_str().expect("prompt").to_string(),
        add_special_tokens: case["kind"] == "text",
        parameters: Some(pb::NextTokenChooserParameters {
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: max_new,
            stop_sequences: vec![],
            ignore_eos_token: true,
        }),
        blocks: blocks.take(prompt + max_new as usize),
        ..Default::default()
    }
}

pub fn batch(id: u64, requests: Vec<pb::Request>) -> pb::Batch {
    pb::Batch {
        id,
        size: requests.len() as u32,
        requests,
        ..Default::default()
    }
}

/// Collected output per request id.
#[derive(Default)]
pub struct Outputs(pub HashMap<u64, Vec<u32>>);

impl Outputs {
    pub fn add(&mut self, generations: &[pb::Generation]) {
        for g in generations {
            self.0
                .entry(g.request_id)
                .or_default()
                .extend(g.tokens.as_ref().expect("tokens").ids.iter().copied());
        }
    }

    pub fn get(&self, id: u64) -> &[u32] {
        self.0.get(&id).map(Vec::as_slice).unwrap_or_default()
    }
}

/// Decodes `cached` until every request in it has finished.
pub fn run_to_end(runner: &mut Runner, mut cached: Option<pb::CachedBatch>, out: &mut Outputs) {
    while let Some(b) = cached {
        let step = runner.decode(&[b]).expect("decode");
        out.add(&step.generations);
        cached = step.batch;
    }
}

/// Runs `requests` as one batch to completion and returns each request's tokens.
pub fn generate(runner: &mut Runner, requests: Vec<pb::Request>) -> Outputs {
    let mut out = Outputs::default();
    let step = runner.prefill(&batch(1, requests), None).expect("prefill");
    out.add(&step.generations);
    run_to_end(runner, step.batch, &mut out);
    out
}

/// Last-position logits of each prompt, computed as one batched forward pass into a fresh pool.
pub fn last_logits(runner: &Runner, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let _guard = tch::no_grad_guard();
    let total: usize = prompts.iter().map(|p| p.len().div_ceil(BLOCK)).sum();
    let mut pool = KvPool::new(runner.model.kv_layout(), BLOCK, total + 1).expect("pool");
    let flat: Vec<i64> = prompts.iter().flatten().map(|&t| t as i64).collect();
    let positions: Vec<i64> = prompts.iter().flat_map(|p| 0..p.len() as i64).collect();
    let (mut rows, mut spans, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    let (mut start, mut block) = (0i64, 1i64);
    for p in prompts {
        let n = p.len() as i64;
        slots.extend((0..n).map(|i| block * BLOCK as i64 + i));
        block += (p.len().div_ceil(BLOCK)) as i64;
        spans.push(PrefillSpan {
            start,
            len: n,
            past: 0,
            context: None,
        });
        start += n;
        rows.push(start - 1);
    }
    let on = |v: &[i64]| Tensor::from_slice(v).to_device(runner.model.device());
    let input = ForwardInput {
        input_ids: on(&flat),
        positions: on(&positions),
        slots: on(&slots),
        prefills: spans,
        decode: None,
        logit_rows: on(&rows),
    };
    let logits = runner
        .model
        .forward(&input, &mut pool)
        .to_device(Device::Cpu)
        .to_kind(tch::Kind::Float);
    (0..prompts.len() as i64)
        .map(|i| Vec::<f32>::try_from(logits.get(i)).expect("row"))
        .collect()
}
