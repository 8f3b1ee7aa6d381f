//! Correctness against transformers, for every supported architecture: the tiny random
//! checkpoints and their reference outputs are made by `make test-models`
//! (scripts/make_tiny.py and scripts/make_refs.py).
//!
//! - f32: greedy tokens are identical to transformers for a whole batch of prompts of different
//!   lengths run together through prefill + decode, and last-position logits agree within 1e-4.
//! - bf16: exact ids are not comparable (torch's own bf16 drifts from f32), so the last-position
//!   top-5 logits must be within 0.25 of torch's bf16 run and within 0.5 of the f32 reference,
//!   and the first token must match wherever the f32 top-1/top-2 gap exceeds 0.5.
//! - f16 (CUDA only): the same checks against the f32 reference; there is no torch f16
//!   reference, and f16's 10-bit mantissa is finer than bf16's 7.
//!
//! `TESSERA_TEST_DEVICE=cuda` runs all of it on a GPU (tests/common/mod.rs).

mod common;

use common::*;
use tessera_shard::Runner;

#[test]
fn f32_greedy_batch_matches_transformers_token_for_token() {
    for model in MODELS {
        let r = refs(model);
        let cases = cases(&r);
        let mut runner = load(model, "float32", 256);
        for c in &cases {
            let enc = runner
                .tokenizer
                .encode(c["prompt"].as_str().unwrap(), c["kind"] == "text")
                .unwrap();
            assert_eq!(
                enc.get_ids(),
                ids(&c["input_ids"]).as_slice(),
                "{model}: tokenization of {:?}",
                c["prompt"]
            );
        }
        let mut blocks = Blocks::default();
        let requests = (0..cases.len())
            .map(|i| request(i as u64, &cases[i], 20, &mut blocks))
            .collect();
        let out = generate(&mut runner, requests);
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(
                out.get(i as u64),
                ids(&c["greedy"]["ids"]).as_slice(),
                "{model}: greedy tokens for {:?}",
                c["prompt"]
            );
        }
    }
}

/// The same prompts, each several times in one batch of at least 24: decode steps of 9 rows
/// or more take other CPU kernels than small batches do (`kernels::gemm`, and from 17 rows
/// `kernels::outer` for f32 on AVX-512). A prompt's copies
/// are side by side, so their prefill attention runs as one batched call (`fresh_prompts`).
#[test]
fn f32_greedy_matches_transformers_in_a_batch_of_many() {
    for model in MODELS {
        let r = refs(model);
        let cases = cases(&r);
        let copies = 24usize.div_ceil(cases.len()).max(2);
        let mut runner = load(model, "float32", 256);
        let mut blocks = Blocks::default();
        let requests = (0..cases.len() * copies)
            .map(|i| request(i as u64, &cases[i / copies], 20, &mut blocks))
            .collect();
        let out = generate(&mut runner, requests);
        for i in 0..cases.len() * copies {
            let c = &cases[i / copies];
            assert_eq!(
                out.get(i as u64),
                ids(&c["greedy"]["ids"]).as_slice(),
                "{model}: greedy tokens for {:?} (copy {})",
                c["prompt"],
                i % copies
            );
        }
    }
}

#[test]
fn f32_last_logits_within_1e_4() {
    for model in MODELS {
        let r = refs(model);
        let cases = cases(&r);
        let runner = load(model, "float32", 2);
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"])).collect();
        let logits = last_logits(&runner, &prompts);
        let mut worst = 0f64;
        for (c, row) in cases.iter().zip(&logits) {
            let last = &c["last_logits"];
            let top = ids(&last["top5"]["ids"]);
            for (id, want) in top.iter().zip(floats(&last["top5"]["values"])) {
                worst = worst.max((row[*id as usize] as f64 - want).abs());
            }
            for (i, want) in floats(&last["first8"]).into_iter().enumerate() {
                worst = worst.max((row[i] as f64 - want).abs());
            }
            if let Some(full) = c.get("last_logits_full") {
                for (got, want) in row.iter().zip(floats(full)) {
                    worst = worst.max((*got as f64 - want).abs());
                }
            }
        }
        eprintln!("{model}: f32 max abs logit difference {worst:.2e}");
        // The reference values are rounded to 6 decimals, well inside the tolerance.
        assert!(worst < 1e-4, "{model}: max |logit - reference| = {worst}");
    }
}

#[test]
fn half_precision_within_stated_tolerance() {
    for dtype in half_dtypes() {
        for model in MODELS {
            half_precision_case(model, dtype);
        }
    }
}

fn half_precision_case(model: &str, dtype: &str) {
    let r = refs(model);
    let cases = cases(&r);
    let mut runner = load(model, dtype, 256);
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"])).collect();
    let logits = last_logits(&runner, &prompts);
    let mut blocks = Blocks::default();
    let requests = (0..cases.len())
        .map(|i| request(i as u64, &cases[i], 1, &mut blocks))
        .collect();
    let firsts = generate(&mut runner, requests);
    for (i, (c, row)) in cases.iter().zip(&logits).enumerate() {
        let f32_top = &c["last_logits"]["top5"];
        for (id, want) in ids(&f32_top["ids"]).iter().zip(floats(&f32_top["values"])) {
            let got = row[*id as usize] as f64;
            assert!(
                (got - want).abs() < 0.5,
                "{model} {:?}: {dtype} logit {got} vs f32 {want}",
                c["prompt"]
            );
        }
        if dtype == "bfloat16" {
            let bf16_top = &c["bf16"]["last_logits_top5"];
            for (id, want) in ids(&bf16_top["ids"])
                .iter()
                .zip(floats(&bf16_top["values"]))
            {
                let got = row[*id as usize] as f64;
                assert!(
                    (got - want).abs() < 0.25,
                    "{model} {:?}: bf16 logit {got} vs torch bf16 {want}",
                    c["prompt"]
                );
            }
        }
        let vals = floats(&f32_top["values"]);
        if vals[0] - vals[1] > 0.5 {
            assert_eq!(
                firsts.get(i as u64)[0],
                ids(&f32_top["ids"])[0],
                "{model} {:?}: first {dtype} token",
                c["prompt"]
            );
        }
    }
}

#[test]
fn f32_prompt_logprobs_match_transformers() {
    for model in MODELS {
        let r = refs(model);
        let cases = cases(&r);
        let mut runner = load(model, "float32", 128);
        let mut blocks = Blocks::default();
        let requests = cases
            .iter()
            .enumerate()
            .map(|(i, c)| tessera_proto::Request {
                prefill_logprobs: true,
                ..request(i as u64, c, 1, &mut blocks)
            })
            .collect::<Vec<_>>();
        let out = runner.prefill(&batch(3, requests), None).expect("prefill");
        let mut worst = 0f64;
        for g in &out.generations {
            let case = &cases[g.request_id as usize];
            let prefill = g.prefill_tokens.as_ref().expect("prefill tokens");
            assert_eq!(prefill.ids, ids(&case["input_ids"]), "{model}");
            let want = case["prompt_logprobs"].as_array().expect("logprobs");
            assert!(
                prefill.logprobs[0].is_nan(),
                "the first prompt token has no logprob"
            );
            for (got, want) in prefill.logprobs.iter().zip(want).skip(1) {
                worst = worst.max((*got as f64 - want.as_f64().expect("logprob")).abs());
            }
        }
        assert!(
            worst < 1e-4,
            "{model}: max |prompt logprob - reference| = {worst}"
        );
    }
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let dir = std::env::temp_dir().join(format!("tessera-bloom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type":"bloom"}"#).unwrap();
    let err = Runner::load(&dir, None, device()).err().expect("must fail");
    let msg = err.to_string();
    for arch in [
        "bloom", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2",
    ] {
        assert!(msg.contains(arch), "{msg}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
