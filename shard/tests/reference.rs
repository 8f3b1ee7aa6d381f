//! Correctness against transformers: the tiny random checkpoints and their reference outputs
//! are made by `make test-models` (scripts/make_tiny.py and scripts/make_refs.py).
//!
//! - f32: greedy tokens are identical to transformers for a whole batch of prompts of different
//!   lengths run together through prefill + decode, and last-position logits agree within 1e-4.
//! - bf16: exact ids are not comparable (torch's own bf16 drifts from f32), so the last-position
//!   top-5 logits must be within 0.25 of torch's bf16 run and within 0.5 of the f32 reference,
//!   and the first token must match wherever the f32 top-1/top-2 gap exceeds 0.5.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Device, Tensor};
use tessera_proto as pb;
use tessera_shard::kv_cache::SeqKvCache;
use tessera_shard::model::ForwardInput;
use tessera_shard::Runner;

const MODELS: &[&str] = &["tiny-llama", "tiny-mistral", "tiny-qwen2"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn refs(model: &str) -> Value {
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

fn load(model: &str, dtype: &str) -> Runner {
    Runner::load(
        &root().join("models/tiny").join(model),
        Some(dtype),
        Device::Cpu,
    )
    .expect("load model")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect()
}

fn request(id: u64, case: &Value, max_new: u32) -> pb::Request {
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
        ..Default::default()
    }
}

/// Runs every case of the reference file as one batch, greedy, through Prefill and Decode.
fn generate_batch(runner: &mut Runner, cases: &[Value], max_new: u32) -> Vec<Vec<u32>> {
    let batch = pb::Batch {
        id: 7,
        requests: cases
            .iter()
            .enumerate()
            .map(|(i, c)| request(i as u64, c, max_new))
            .collect(),
        size: cases.len() as u32,
        ..Default::default()
    };
    let mut out = vec![Vec::new(); cases.len()];
    let mut step = runner.prefill(&batch, None).expect("prefill");
    loop {
        for g in &step.generations {
            out[g.request_id as usize]
                .extend(g.tokens.as_ref().expect("tokens").ids.iter().copied());
        }
        match step.batch.take() {
            Some(b) => step = runner.decode(&[b]).expect("decode"),
            None => break,
        }
    }
    out
}

/// Last-position logits of each case, computed as one batched forward pass.
fn last_logits(runner: &Runner, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let _guard = tch::no_grad_guard();
    let mut caches: Vec<SeqKvCache> = prompts
        .iter()
        .map(|p| SeqKvCache::new(runner.model.kv_layout(), p.len()))
        .collect();
    let flat: Vec<i64> = prompts.iter().flatten().map(|&t| t as i64).collect();
    let positions: Vec<i64> = prompts.iter().flat_map(|p| 0..p.len() as i64).collect();
    let mut rows = Vec::new();
    let mut end = 0i64;
    for p in prompts {
        end += p.len() as i64;
        rows.push(end - 1);
    }
    let input = ForwardInput {
        input_ids: Tensor::from_slice(&flat),
        positions: Tensor::from_slice(&positions),
        new_tokens: prompts.iter().map(|p| p.len()).collect(),
        logit_rows: Tensor::from_slice(&rows),
    };
    let mut refs: Vec<&mut SeqKvCache> = caches.iter_mut().collect();
    let logits = runner.model.forward(&input, &mut refs);
    (0..prompts.len() as i64)
        .map(|i| Vec::<f32>::try_from(logits.get(i)).expect("row"))
        .collect()
}

#[test]
fn f32_greedy_batch_matches_transformers_token_for_token() {
    for model in MODELS {
        let r = refs(model);
        let cases = r["cases"].as_array().expect("cases");
        let mut runner = load(model, "float32");
        for c in cases {
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
        let got = generate_batch(&mut runner, cases, 20);
        for (c, g) in cases.iter().zip(&got) {
            assert_eq!(
                g,
                &ids(&c["greedy"]["ids"]),
                "{model}: greedy tokens for {:?}",
                c["prompt"]
            );
        }
    }
}

#[test]
fn f32_last_logits_within_1e_4() {
    for model in MODELS {
        let r = refs(model);
        let cases = r["cases"].as_array().expect("cases");
        let runner = load(model, "float32");
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
        }
        eprintln!("{model}: f32 max abs logit difference {worst:.2e}");
        // The reference values are rounded to 6 decimals, well inside the tolerance.
        assert!(worst < 1e-4, "{model}: max |logit - reference| = {worst}");
    }
}

#[test]
fn bf16_within_stated_tolerance() {
    for model in MODELS {
        let r = refs(model);
        let cases = r["cases"].as_array().expect("cases");
        let mut runner = load(model, "bfloat16");
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"])).collect();
        let logits = last_logits(&runner, &prompts);
        let firsts = generate_batch(&mut runner, cases, 1);
        for ((c, row), first) in cases.iter().zip(&logits).zip(&firsts) {
            let f32_top = &c["last_logits"]["top5"];
            for (id, want) in ids(&f32_top["ids"]).iter().zip(floats(&f32_top["values"])) {
                let got = row[*id as usize] as f64;
                assert!(
                    (got - want).abs() < 0.5,
                    "{model} {:?}: bf16 logit {got} vs f32 {want}",
                    c["prompt"]
                );
            }
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
            let vals = floats(&f32_top["values"]);
            if vals[0] - vals[1] > 0.5 {
                assert_eq!(
                    first[0],
                    ids(&f32_top["ids"])[0],
                    "{model} {:?}: first bf16 token",
                    c["prompt"]
                );
            }
        }
    }
}

#[test]
fn f32_prompt_logprobs_match_transformers() {
    for model in MODELS {
        let r = refs(model);
        let cases = r["cases"].as_array().expect("cases");
        let mut runner = load(model, "float32");
        let requests = cases
            .iter()
            .enumerate()
            .map(|(i, c)| pb::Request {
                prefill_logprobs: true,
                ..request(i as u64, c, 1)
            })
            .collect::<Vec<_>>();
        let batch = pb::Batch {
            id: 3,
            size: requests.len() as u32,
            requests,
            ..Default::default()
        };
        let out = runner.prefill(&batch, None).expect("prefill");
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
