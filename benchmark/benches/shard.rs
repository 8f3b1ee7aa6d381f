//! Shard hot paths on the default model (SmolLM2-135M-Instruct), each against a roofline
//! measured in the same run on the same machine:
//!
//! - decode at batch 1 is memory-bound: every token reads all weights once, so the roofline is
//!   (measured read bandwidth) / (weight bytes);
//! - decode at batch 8 reads the weights once for 8 tokens; same roofline × 8 as the ideal;
//! - prefill is compute-bound: the roofline is (measured large-matmul FLOP/s) / (2 × params).
//!
//! Run: `cargo bench -p tessera-benchmark` (after `make model`). Set TESSERA_BENCH_DTYPE=float32
//! to measure f32.

use std::path::Path;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tessera_proto as pb;
use tessera_shard::Runner;

const MODEL: &str = "models/SmolLM2-135M-Instruct";

fn request(id: u64, prompt_tokens: u32, new_tokens: u32) -> pb::Request {
    pb::Request {
        id,
        inputs: "The quick brown fox jumps over the lazy dog. ".repeat(prompt_tokens as usize),
        truncate: prompt_tokens,
        add_special_tokens: true,
        parameters: Some(pb::NextTokenChooserParameters {
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: new_tokens,
            stop_sequences: vec![],
            ignore_eos_token: true,
        }),
        ..Default::default()
    }
}

/// Seconds per decode step for `batch` sequences, after one prefill.
fn decode_step_seconds(runner: &mut Runner, batch: usize, steps: u32) -> f64 {
    let b = pb::Batch {
        id: 1,
        requests: (0..batch as u64)
            .map(|i| request(i, 32, steps + 1))
            .collect(),
        size: batch as u32,
        ..Default::default()
    };
    let mut cached = runner.prefill(&b, None).expect("prefill").batch;
    // One untimed step so allocations settle.
    cached = runner
        .decode(&[cached.expect("batch")])
        .expect("decode")
        .batch;
    let start = Instant::now();
    let mut n = 0;
    while let Some(c) = cached {
        cached = runner.decode(&[c]).expect("decode").batch;
        n += 1;
    }
    start.elapsed().as_secs_f64() / n as f64
}

fn prefill_seconds(runner: &mut Runner, tokens: u32) -> f64 {
    let b = pb::Batch {
        id: 2,
        requests: vec![request(0, tokens, 1)],
        size: 1,
        ..Default::default()
    };
    runner.prefill(&b, None).expect("warm prefill");
    let start = Instant::now();
    let reps = 3;
    for _ in 0..reps {
        runner.prefill(&b, None).expect("prefill");
    }
    start.elapsed().as_secs_f64() / reps as f64
}

/// Sustained read bandwidth in bytes/s over a buffer as large as the weights.
fn read_bandwidth(bytes: i64) -> f64 {
    let t = Tensor::ones([bytes / 4], (Kind::Float, Device::Cpu));
    let _ = t.sum(Kind::Float);
    let start = Instant::now();
    let reps = 10;
    for _ in 0..reps {
        let _ = f64::try_from(t.sum(Kind::Float)).unwrap_or(0.0);
    }
    (bytes * reps) as f64 / start.elapsed().as_secs_f64()
}

/// Large-matmul throughput in FLOP/s for `kind`.
fn matmul_flops(kind: Kind) -> f64 {
    let n = 2048;
    let a = Tensor::randn([n, n], (kind, Device::Cpu));
    let _ = a.matmul(&a);
    let start = Instant::now();
    let reps = 5;
    for _ in 0..reps {
        let _ = a.matmul(&a);
    }
    (2 * n * n * n * reps) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join(MODEL);
    if !dir.join("model.safetensors").exists() {
        eprintln!("{} is missing: run `make model` first", dir.display());
        std::process::exit(1);
    }
    let dtype = std::env::var("TESSERA_BENCH_DTYPE").unwrap_or_else(|_| "bfloat16".into());
    let _guard = tch::no_grad_guard();
    let mut runner = Runner::load(&dir, Some(&dtype), Device::Cpu).expect("load");
    let c = runner.model.config.clone();
    let kind = runner.model.kind();
    let params = (c.vocab_size * c.hidden_size
        + c.num_layers
            * (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                + c.num_heads * c.head_dim * c.hidden_size
                + 3 * c.hidden_size * c.intermediate_size)) as f64;
    let weight_bytes = params * kind.elt_size_in_bytes() as f64;
    let bandwidth = read_bandwidth(weight_bytes as i64);
    let flops = matmul_flops(kind);
    let roof_decode = bandwidth / weight_bytes;
    let roof_prefill = flops / (2.0 * params);

    println!(
        "model {MODEL}, {dtype}, {:.1}M params ({:.0} MB), {} threads",
        params / 1e6,
        weight_bytes / 1e6,
        tch::get_num_threads()
    );
    println!(
        "measured: read bandwidth {:.1} GB/s, matmul {:.0} GFLOP/s",
        bandwidth / 1e9,
        flops / 1e9
    );
    println!("| benchmark | Tessera | roofline | ratio |");
    println!("|---|---|---|---|");
    let t1 = decode_step_seconds(&mut runner, 1, 64);
    println!(
        "| decode, batch 1 (tok/s) | {:.1} | {:.1} | {:.2} |",
        1.0 / t1,
        roof_decode,
        (1.0 / t1) / roof_decode
    );
    let t8 = decode_step_seconds(&mut runner, 8, 32);
    println!(
        "| decode, batch 8 (tok/s) | {:.1} | {:.1} | {:.2} |",
        8.0 / t8,
        8.0 * roof_decode,
        (8.0 / t8) / (8.0 * roof_decode)
    );
    let tp = prefill_seconds(&mut runner, 512);
    println!(
        "| prefill, 512 tokens (tok/s) | {:.0} | {:.0} | {:.2} |",
        512.0 / tp,
        roof_prefill,
        (512.0 / tp) / roof_prefill
    );
}
