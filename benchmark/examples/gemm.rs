//! The decode-step products of SmolLM2-135M (every weight shape of a layer, and the LM head)
//! at a few row counts: Tessera's CPU kernels against libtorch's `linear` on the same tensors,
//! interleaved, and both against the large-square-matmul rate measured in the same run.
//! Run: `cargo run --release -p tessera-benchmark --example gemm -- [dtype] [rows]`, e.g.
//! `-- float32 8,16,32,64` (defaults: float32, 1,8,9,16,32,64,128).

use std::time::Instant;

use tch::{Device, Kind, Tensor};

/// `(name, out features, in features)`, as the shard fuses them (qkv and gate/up in one).
const SHAPES: [(&str, i64, i64); 5] = [
    ("qkv", 960, 576),
    ("o", 576, 576),
    ("gate_up", 3072, 576),
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
];

/// Median seconds of `f` over enough runs to take about 0.3 s.
fn time(f: &dyn Fn()) -> f64 {
    f();
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-6);
    let reps = ((0.3 / once) as usize).clamp(3, 200);
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

fn main() {
    let _guard = tch::no_grad_guard();
    let kind = match std::env::args().nth(1).as_deref() {
        Some("bfloat16") => Kind::BFloat16,
        _ => Kind::Float,
    };
    let rows: Vec<i64> = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "1,8,9,16,32,64,128".into())
        .split(',')
        .filter_map(|r| r.parse().ok())
        .collect();
    let square = Tensor::randn([2048, 2048], (Kind::Float, Device::Cpu));
    let peak = 2.0 * 2048f64.powi(3) / time(&|| drop(square.matmul(&square)));
    println!(
        "{kind:?}, {} threads; f32 2048² matmul {:.1} GFLOP/s",
        tch::get_num_threads(),
        peak / 1e9
    );
    println!(
        "| rows | product | Tessera GFLOP/s | libtorch GFLOP/s | vs libtorch | of matmul peak |"
    );
    println!("|---|---|---|---|---|---|");
    for &m in &rows {
        let (mut ours_all, mut torch_all, mut flops_all) = (0.0, 0.0, 0.0);
        for (name, n, k) in SHAPES {
            let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu)).to_kind(kind);
            let w = (Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.05).to_kind(kind);
            let ours = || {
                let y = tessera_shard::kernels::decode_product(&x, &w);
                drop(y.unwrap_or_else(|| x.linear::<Tensor>(&w, None)));
            };
            let torch = || drop(x.linear::<Tensor>(&w, None));
            // Interleaved, best of two rounds each: this VM's speed drifts within minutes.
            let (mut t_ours, mut t_torch) = (f64::MAX, f64::MAX);
            for _ in 0..2 {
                t_ours = t_ours.min(time(&ours));
                t_torch = t_torch.min(time(&torch));
            }
            let flops = 2.0 * (m * n * k) as f64;
            ours_all += t_ours;
            torch_all += t_torch;
            flops_all += flops;
            println!(
                "| {m} | {name} | {:.1} | {:.1} | {:.2}x | {:.2} |",
                flops / t_ours / 1e9,
                flops / t_torch / 1e9,
                t_torch / t_ours,
                flops / t_ours / peak
            );
        }
        println!(
            "| {m} | **a layer's products and the head, once each** | {:.1} | {:.1} | {:.2}x | {:.2} |",
            flops_all / ours_all / 1e9,
            flops_all / torch_all / 1e9,
            torch_all / ours_all,
            flops_all / ours_all / peak
        );
    }
}
