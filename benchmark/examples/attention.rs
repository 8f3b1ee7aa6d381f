//! Decode attention alone, at SmolLM2-135M's shapes (9 query heads over 3 KV heads of 64, 30
//! layers): the K/V bytes it reads per second against the machine's read bandwidth, measured in
//! the same run. A decode step must read every sequence's whole context once per layer, so this
//! ratio is how close the kernel comes to its own roofline.
//! Run: `cargo run --release -p tessera-benchmark --example attention -- [dtype] [batch] [context]`,
//! e.g. `-- bfloat16 32 192` (the defaults: the shard benchmark's batch-32 decode at its mean
//! context, 128 prompt tokens plus half of 128 new ones).

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tessera_shard::kernels::attention::DecodeShape;
use tessera_shard::kernels::decode_attention;

const LAYERS: usize = 30;
const HEADS: i64 = 9;
const KV_HEADS: i64 = 3;
const HEAD_DIM: i64 = 64;
const BLOCK: usize = 16;

fn main() {
    let _guard = tch::no_grad_guard();
    let arg = |i: usize| std::env::args().nth(i);
    let kind = match arg(1).as_deref() {
        Some("float32") => Kind::Float,
        _ => Kind::BFloat16,
    };
    let batch: usize = arg(2).and_then(|s| s.parse().ok()).unwrap_or(32);
    let context: usize = arg(3).and_then(|s| s.parse().ok()).unwrap_or(192);
    // Every sequence's blocks apart from the others', as the router's allocator hands them out
    // to a batch admitted together, in a pool with room to spare.
    let per = context.div_ceil(BLOCK);
    let slots = (1 + batch * per) * BLOCK * 2;
    let layers: Vec<(Tensor, Tensor)> = (0..LAYERS)
        .map(|_| {
            let pool = || {
                (Tensor::randn(
                    [slots as i64, KV_HEADS, HEAD_DIM],
                    (Kind::Float, Device::Cpu),
                ) * 0.5)
                    .to_kind(kind)
            };
            (pool(), pool())
        })
        .collect();
    let tables: Vec<Vec<i64>> = (0..batch)
        .map(|b| {
            let first = (1 + b * per) * BLOCK;
            (first..first + context).map(|s| s as i64).collect()
        })
        .collect();
    let context_refs: Vec<&[i64]> = tables.iter().map(|t| t.as_slice()).collect();
    let q =
        Tensor::randn([batch as i64, HEADS, HEAD_DIM], (Kind::Float, Device::Cpu)).to_kind(kind);
    let shape = DecodeShape {
        num_heads: HEADS as usize,
        num_kv_heads: KV_HEADS as usize,
        head_dim: HEAD_DIM as usize,
        scale: 0.125,
        softcap: None,
        window: None,
    };
    let step = || {
        for (k, v) in &layers {
            let out = decode_attention(&q, k, v, &context_refs, shape).expect("kernel applies");
            drop(out);
        }
    };
    step();
    let bandwidth =
        tessera_benchmark::peak_read_bandwidth(&tessera_benchmark::probe_buffer(Device::Cpu));
    let mut best = f64::MAX;
    for _ in 0..20 {
        let start = Instant::now();
        step();
        best = best.min(start.elapsed().as_secs_f64());
    }
    let bytes = (2 * LAYERS * batch * context) as f64
        * (KV_HEADS * HEAD_DIM) as f64
        * kind.elt_size_in_bytes() as f64;
    println!(
        "{kind:?}, batch {batch}, context {context}, {} threads: {:.2} ms a step ({LAYERS} layers), \
         {:.1} MB of K/V at {:.1} GB/s, {:.2} of the read bandwidth ({:.1} GB/s)",
        tch::get_num_threads(),
        best * 1e3,
        bytes / 1e6,
        bytes / best / 1e9,
        bytes / best / bandwidth,
        bandwidth / 1e9
    );
}
