//! Splits a decode step's time into the forward pass and token choice (sampling, detokenizing,
//! stop checks), at a few batch sizes: the first question when decode is slower than its roofline.
//! Run: `cargo run --release -p tessera-benchmark --example step_profile -- [dtype] [batches] [steps]`,
//! e.g. `-- float32 32 100` (defaults: float32, 1,8,32, 32 steps). `TESSERA_BENCH_DEVICE=cuda` runs it
//! on a GPU. `TESSERA_PROFILE_PASS_EVERY=N` runs the shard benchmark's read pass before every
//! N-th step and prints the steps' median time by their distance from the last pass: how many
//! steps a pass disturbs (the benchmark leaves them untimed, its `SETTLE`). `TESSERA_NO_PLAN=1`
//! runs CPU decode steps op by op instead of as one plan of kernels (`decode_plan`).

use std::path::PathBuf;

use tessera_proto as pb;
use tessera_shard::runner::BLOCK_SIZE;
use tessera_shard::Runner;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dtype = std::env::args().nth(1).unwrap_or_else(|| "float32".into());
    let _guard = tch::no_grad_guard();
    let device = tessera_benchmark::device();
    let mut runner = Runner::load(
        &root.join("models/SmolLM2-135M-Instruct"),
        Some(&dtype),
        device,
    )
    .expect("load (run `make model`)");
    // For comparison: decode steps op by op instead of as one plan of kernels.
    runner.model.plan_decode = std::env::var_os("TESSERA_NO_PLAN").is_none();
    let batches: Vec<usize> = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "1,8,32".into())
        .split(',')
        .filter_map(|b| b.parse().ok())
        .collect();
    let steps: u32 = std::env::args()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let pass_every: usize = std::env::var("TESSERA_PROFILE_PASS_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let probe = (pass_every > 0).then(|| tessera_benchmark::probe_buffer(device));
    let per = (128 + steps as usize + 1).div_ceil(BLOCK_SIZE) as u32;
    let most = batches.iter().copied().max().unwrap_or(1);
    runner.allocate_pool(1 + most * per as usize).expect("pool");
    for batch in batches {
        let requests = (0..batch as u32)
            .map(|i| pb::Request {
                id: i as u64,
                inputs: format!("{i} ")
                    + &"The quick brown fox jumps over the lazy dog. ".repeat(128),
                truncate: 128,
                add_special_tokens: true,
                parameters: Some(pb::NextTokenChooserParameters {
                    repetition_penalty: 1.0,
                    ..Default::default()
                }),
                stopping_parameters: Some(pb::StoppingCriteriaParameters {
                    max_new_tokens: steps + 1,
                    ignore_eos_token: true,
                    ..Default::default()
                }),
                blocks: (1 + i * per..1 + (i + 1) * per).collect(),
                ..Default::default()
            })
            .collect::<Vec<_>>();
        let b = pb::Batch {
            id: 1,
            size: batch as u32,
            requests,
            ..Default::default()
        };
        let start = std::time::Instant::now();
        let mut cached = runner.prefill(&b, None).expect("prefill").batch;
        let prefill = start.elapsed();
        let (mut fwd, mut dec, mut n) = (0u64, 0u64, 0u64);
        let mut since_pass = vec![Vec::new(); pass_every];
        while let Some(c) = cached {
            if let Some(probe) = &probe {
                if (n as usize).is_multiple_of(pass_every) {
                    tessera_benchmark::read_pass(probe);
                }
            }
            let start = std::time::Instant::now();
            let out = runner.decode(&[c]).expect("decode");
            if probe.is_some() {
                since_pass[n as usize % pass_every].push(start.elapsed().as_secs_f64());
            }
            fwd += out.forward_ns;
            dec += out.decode_ns;
            n += 1;
            cached = out.batch;
        }
        println!(
            "{dtype} batch {batch}: prefill {:.1} ms; forward {:.2} ms, token choice {:.2} ms per step",
            prefill.as_secs_f64() * 1e3,
            fwd as f64 / n as f64 / 1e6,
            dec as f64 / n as f64 / 1e6
        );
        if probe.is_some() {
            let medians: Vec<String> = since_pass
                .iter()
                .map(|t| format!("{:.2}", tessera_benchmark::median(t) * 1e3))
                .collect();
            println!(
                "  whole steps by distance from the last read pass (0 = right after), median ms: {}",
                medians.join(" ")
            );
        }
    }
}
