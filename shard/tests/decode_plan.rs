//! A CPU decode step planned whole (`model::decode_plan`) against the same step run op by op:
//! the same kernels on the same parts, so every generated token, its log-probability and the
//! top-5 alternatives' must be the same bits, at every batch size that picks another product
//! kernel (1 and 5 rows: `matvec`; 12: `gemm`, or AMX in bf16; 24: `outer` in f32 on
//! AVX-512, AMX in bf16), in f32 and bf16, with and without biases (Qwen2) and a sliding
//! window. The models the plan does not cover must fall back.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use tessera_proto as pb;
use tessera_shard::Runner;

/// Per request, each step's token, log-probability and top-5 (id, log-probability) as bits.
type Trace = Vec<(u64, Vec<(u32, u32, Vec<(u32, u32)>)>)>;

fn trace(runner: &mut Runner, size: usize, cases: &[serde_json::Value]) -> Trace {
    let mut blocks = Blocks::default();
    let requests: Vec<pb::Request> = (0..size)
        .map(|i| {
            let mut r = request(i as u64, &cases[i % cases.len()], 6, &mut blocks);
            r.top_n_tokens = 5;
            r
        })
        .collect();
    let mut out: std::collections::BTreeMap<u64, Vec<_>> = Default::default();
    let mut add = |gens: &[pb::Generation]| {
        for g in gens {
            let t = g.tokens.as_ref().expect("tokens");
            let top: Vec<(u32, u32)> = g
                .top_tokens
                .iter()
                .flat_map(|top| top.ids.iter().zip(&top.logprobs))
                .map(|(&id, lp)| (id, lp.to_bits()))
                .collect();
            for (&id, lp) in t.ids.iter().zip(&t.logprobs) {
                out.entry(g.request_id)
                    .or_default()
                    .push((id, lp.to_bits(), top.clone()));
            }
        }
    };
    let step = runner.prefill(&batch(1, requests), None).expect("prefill");
    add(&step.generations);
    let mut cached = step.batch;
    while let Some(b) = cached {
        let step = runner.decode(&[b]).expect("decode");
        add(&step.generations);
        cached = step.batch;
    }
    out.into_iter().collect()
}

#[test]
fn planned_steps_are_the_op_by_op_steps_bit_for_bit() {
    if device() != tch::Device::Cpu {
        eprintln!("skipping: the plan is the CPU's");
        return;
    }
    // A sliding window (Mistral's) of 8 tokens, shorter than every context here, forced on
    // the tiny Llama: none of the tiny checkpoints the plan covers has one.
    for (model, window) in [
        ("tiny-llama", None),
        ("tiny-llama", Some(8)),
        ("tiny-mistral", None),
        ("tiny-qwen2", None),
        ("tiny-llama3rope", None),
        ("tiny-llama-linrope", None),
    ] {
        let cases = cases(&refs(model));
        for dtype in ["float32", "bfloat16"] {
            let mut runner = load(model, dtype, 512);
            for layer in &mut runner.model.layers {
                layer.window = window.or(layer.window);
            }
            for size in [1, 5, 12, 24] {
                runner.model.plan_decode = true;
                let before = runner.model.planned_steps.load(Ordering::Relaxed);
                let built_before = runner.model.plans_built.load(Ordering::Relaxed);
                let planned = trace(&mut runner, size, &cases);
                let steps = runner.model.planned_steps.load(Ordering::Relaxed) - before;
                let built = runner.model.plans_built.load(Ordering::Relaxed) - built_before;
                // Six new tokens: the first from the prefill, five decode steps. The batch
                // keeps its shape, so the first step's plan runs the other four, with their
                // tokens, positions and one more context slot a row each time.
                assert_eq!(
                    (steps, built),
                    (5, 1),
                    "{model} {window:?} {dtype} batch {size}: planned steps, plans built"
                );
                runner.model.plan_decode = false;
                let op_by_op = trace(&mut runner, size, &cases);
                assert_eq!(planned.len(), size);
                assert_eq!(planned, op_by_op, "{model} {window:?} {dtype} batch {size}");
                if window.is_some() && size == 24 {
                    // The window is in force: without it the same batch decodes otherwise.
                    for layer in &mut runner.model.layers {
                        layer.window = None;
                    }
                    runner.model.plan_decode = true;
                    assert_ne!(trace(&mut runner, size, &cases), planned, "{model} {dtype}");
                }
            }
        }
    }
}

#[test]
fn families_the_plan_does_not_cover_run_op_by_op() {
    if device() != tch::Device::Cpu {
        return;
    }
    // q/k norms (Qwen3), a partial rotary dimension (this Phi-3), extra norms (Gemma 2),
    // LayerNorm and learned positions (GPT-2).
    for model in ["tiny-qwen3", "tiny-phi3", "tiny-gemma2", "tiny-gpt2"] {
        let cases = cases(&refs(model));
        let mut runner = load(model, "float32", 256);
        let out = trace(&mut runner, 3, &cases);
        assert!(out.iter().all(|(_, steps)| steps.len() == 6), "{model}");
        let planned = runner.model.planned_steps.load(Ordering::Relaxed);
        assert_eq!(planned, 0, "{model}: planned steps");
    }
}
